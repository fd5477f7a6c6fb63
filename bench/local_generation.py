"""local generation: tokens per second of `local_demo` through the stack
against `model.generate` called directly in one process (issue 6, item 5).

    .venv/bin/python bench/local_generation.py [--repeats 5]

Through the stack: a websocket message to local_demo (greedy, 256 new
tokens, as `manage.py demo_model` configures it), timed from the send to
`chat.done`, with the GPU worker already holding the model. Directly, in
this process once the stack is idle: the same model directory, the same
chat-templated prompt, `model.generate(max_new_tokens=256, do_sample=False)`;
and `LocalEngine.generate` (what the GPU worker calls: a streamer decoding
each token and a stop check), to split the overhead between the engine and
the service around it; and `model.generate` on one torch thread, the
setting that decides how a tiny model fares on a busy 2-core machine.
Repeats alternate between the four. Last, a what-if: the GPU worker is
restarted with OMP_NUM_THREADS=1 and the stack measured again.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import fmt, mark, results_write, spread  # noqa: E402
from bench.stack import BenchStack  # noqa: E402

MODEL = "local_demo"
PROMPT = [{"role": "user", "content": "Hello there"}]
MAX_NEW_TOKENS = 256


class Direct:
    """The floor: the same model and prompt, in this process."""

    def __init__(self, path: Path):
        import torch  # noqa: F401  (imported here: the stack part needs none of it)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gpu_manager.engines import LocalEngine

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
        self.inputs = self.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)
        self.engine = LocalEngine(name=MODEL, path=str(path), device="cpu")
        self.engine.load()

    def generate(self, threads: int | None = None) -> tuple[int, float]:
        """`threads`: torch's intra-op threads for this call (default: torch's
        own choice, one per core, as in the GPU worker)."""
        import torch

        default = torch.get_num_threads()
        torch.set_num_threads(threads or default)
        try:
            started = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(**self.inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            return out.shape[1] - self.inputs["input_ids"].shape[1], time.perf_counter() - started
        finally:
            torch.set_num_threads(default)

    def engine_generate(self) -> tuple[int, float]:
        started = time.perf_counter()
        result = self.engine.generate(PROMPT, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, top_p=1.0,
                                      on_text=lambda text: None, should_stop=lambda: False)
        return result.completion_tokens, time.perf_counter() - started


async def through_stack(stack: BenchStack, timeout: float = 120.0) -> dict:
    conn = await stack.connect()
    reply = await conn.ask(MODEL, PROMPT[0]["content"], timeout=timeout)
    await conn.close()
    if not reply.ok:
        raise RuntimeError(f"local_demo failed: {reply.end}")
    return {"tokens": reply.end["usage"]["completion_tokens"], "seconds": reply.to_done,
            "first": reply.to_first, "streaming_seconds": reply.done - reply.first, "frames": len(reply.seqs),
            "gapless": reply.gapless}


def measure(stack: BenchStack, args) -> dict:
    """Alternate stack / direct / engine; the stack is idle during the direct runs."""
    mark("local_generation")
    runs = {"stack": [], "direct": [], "engine": [], "direct_1_thread": []}
    direct = Direct(Path(stack.env["DEMO_MODEL_DIR"]))
    asyncio.run(through_stack(stack))  # warm-up: the GPU worker takes the GPU and loads the model
    direct.generate()
    direct.engine_generate()
    started = time.monotonic()
    for i in range(args.repeats):
        # On a busy machine two torch threads can make a 0.3 s generation
        # take 10 s: keep the benchmark's time bounded, with 2 repeats at least.
        if i >= 2 and time.monotonic() - started > args.budget:
            print(f"  local_demo: stopped after {i} repeats ({args.budget:.0f} s budget)", flush=True)
            break
        runs["stack"].append(asyncio.run(through_stack(stack)))
        tokens, seconds = direct.generate()
        runs["direct"].append({"tokens": tokens, "seconds": seconds})
        tokens, seconds = direct.engine_generate()
        runs["engine"].append({"tokens": tokens, "seconds": seconds})
        tokens, seconds = direct.generate(threads=1)
        runs["direct_1_thread"].append({"tokens": tokens, "seconds": seconds})
    # What-if: the same GPU worker on one torch thread (OMP_NUM_THREADS=1).
    stack.restart("gpu-worker", OMP_NUM_THREADS="1")
    asyncio.run(through_stack(stack, timeout=180))  # waits for the new worker, which loads the model
    runs["stack_1_thread"] = [asyncio.run(through_stack(stack)) for _ in runs["stack"]]
    print(f"  local_demo: {runs['stack'][-1]['tokens'] / runs['stack'][-1]['seconds']:.0f} tokens/s "
          f"(direct {runs['direct'][-1]['tokens'] / runs['direct'][-1]['seconds']:.0f})", flush=True)
    return runs


def report(runs: dict, args) -> None:
    tps = {k: [r["tokens"] / r["seconds"] for r in v] for k, v in runs.items()}
    per_token = {k: [r["seconds"] / r["tokens"] for r in v] for k, v in runs.items()}
    summary = {
        "tokens_per_second": {k: spread(v) for k, v in tps.items()},
        "stack_over_direct": spread([s / d for s, d in zip(tps["stack"], tps["direct"])]),
        "engine_over_direct": spread([e / d for e, d in zip(tps["engine"], tps["direct"])]),
        "one_thread_over_direct": spread([e / d for e, d in zip(tps["direct_1_thread"], tps["direct"])]),
        "stack_1_thread_over_direct": spread([e / d for e, d in zip(tps["stack_1_thread"], tps["direct"])]),
        "stack_1_thread_overhead_fraction": spread([s / d - 1 for s, d in zip(per_token["stack_1_thread"],
                                                                               per_token["direct"])]),
        "first_token_1_thread": spread([r["first"] for r in runs["stack_1_thread"]]),
        "overhead_fraction": spread([s / d - 1 for s, d in zip(per_token["stack"], per_token["direct"])]),
        "engine_overhead_fraction": spread([e / d - 1 for e, d in zip(per_token["engine"], per_token["direct"])]),
        "tokens": spread([r["tokens"] for r in runs["stack"]]),
        "first_token": spread([r["first"] for r in runs["stack"]]),
        # From the first delta on: the generation and the relay, without the dispatch.
        "streaming_overhead_fraction": spread([s["streaming_seconds"] / d["seconds"] - 1
                                               for s, d in zip(runs["stack"], runs["direct"])]),
        "frames": spread([r["frames"] for r in runs["stack"]]),
        "seq_gaps": sum(not r["gapless"] for r in runs["stack"]),
    }
    rows = [
        ["model.generate, directly", fmt(summary["tokens_per_second"]["direct"], "", digits=0), "1.00x (floor)",
         f"{runs['direct'][0]['tokens']} tokens"],
        ["LocalEngine.generate, directly", fmt(summary["tokens_per_second"]["engine"], "", digits=0),
         fmt(summary["engine_over_direct"], "x", digits=2), "+ streamer decoding each token, stop check"],
        ["  time per token, engine over direct", fmt(summary["engine_overhead_fraction"], " %", 100, 1, True), "",
         ""],
        ["model.generate, directly, 1 torch thread", fmt(summary["tokens_per_second"]["direct_1_thread"], "", digits=0),
         fmt(summary["one_thread_over_direct"], "x", digits=2), "torch.set_num_threads(1): no spinning thread pool"],
        ["through the stack (send → chat.done)", fmt(summary["tokens_per_second"]["stack"], "", digits=0),
         fmt(summary["stack_over_direct"], "x", digits=2),
         f"first delta {fmt(summary['first_token'], ' ms', 1000)}; {fmt(summary['frames'], ' frames', digits=0)}; "
         f"seq gaps {summary['seq_gaps']}"],
        ["  time per token, stack over direct", fmt(summary["overhead_fraction"], " %", 100, 1, True), "",
         "target ≤ +5 %"],
        ["  first delta → done, over direct", fmt(summary["streaming_overhead_fraction"], " %", 100, 1, True), "",
         "the generation and the relay, without the dispatch"],
        ["what-if: the stack, GPU worker with OMP_NUM_THREADS=1",
         fmt(summary["tokens_per_second"]["stack_1_thread"], "", digits=0),
         fmt(summary["stack_1_thread_over_direct"], "x", digits=2),
         f"first delta {fmt(summary['first_token_1_thread'], ' ms', 1000)}; after the other rows, not interleaved"],
        ["  time per token, over direct", fmt(summary["stack_1_thread_overhead_fraction"], " %", 100, 1, True), "",
         "target ≤ +5 %"],
    ]
    results_write("local_generation",
                  tables=[{"title": f"local generation: {MODEL}, greedy, {MAX_NEW_TOKENS} new tokens, cpu; "
                                    f"median (min…max) over {len(runs['stack'])} repeats",
                           "header": ["path", "tokens/s", "÷ direct", "note"], "rows": rows}],
                  figures={"summary": summary, "raw": runs,
                           "params": {k: v for k, v in vars(args).items() if k != "keep"}},
                  notes=["the GPU worker (torch on 2 threads) and this process take turns: "
                         "the stack is idle while the direct runs go"])


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds after which no new repeat starts")
    parser.add_argument("--asgi", default="uvicorn")
    parser.add_argument("--keep", action="store_true")
    return parser


def main() -> None:
    args = parser().parse_args()
    with BenchStack(asgi=args.asgi, keep=args.keep) as stack:
        print(f"{args.asgi}: stack up in {stack.start_seconds:.0f} s", flush=True)
        runs = measure(stack, args)
    report(runs, args)


if __name__ == "__main__":
    main()
