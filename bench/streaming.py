"""streaming: tokens per second relayed to the browser, for one conversation
and for 50 at once; frames per reply; `seq` without gaps (issue 6, item 3).

    .venv/bin/python bench/streaming.py [--repeats 3] [--tokens 200] [--pace 0.01]

The fake Ollama streams a reply of `--tokens` tokens, one every `--pace`
seconds (100 tokens/s: a fast 7B model on a GPU), and, in a second run, as
fast as it can write them ("unpaced": what the relay itself can carry).
Each conversation is its own socket (a browser tab). The floor is the same
stream read directly with the `ollama` client, with the same concurrency.
Every reply is checked: deltas numbered 0..n-1 and their text equal to what
the fake sent.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ollama  # noqa: E402

from bench.common import fmt, mark, results_write, spread  # noqa: E402
from bench.stack import BenchStack, one_stack_main  # noqa: E402

MODEL, UPSTREAM = "ollama_qwen:7b", "qwen:7b"


def reply_text(tokens: int) -> str:
    return " ".join(f"w{i}" for i in range(tokens))


async def ours(stack: BenchStack, conversations: int, expected: str) -> dict:
    conns = [await stack.connect() for _ in range(conversations)]
    started = time.perf_counter()
    replies = await asyncio.gather(*(c.ask(MODEL, "Tell me a long story", timeout=300) for c in conns))
    wall = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in conns))
    tokens = [r.end.get("usage", {}).get("completion_tokens", 0) if r.ok else 0 for r in replies]
    return {
        "wall": wall,
        "tokens": sum(tokens),
        "aggregate_tps": sum(tokens) / wall,
        "per_conversation_tps": statistics.median(t / r.to_done for t, r in zip(tokens, replies) if r.ok),
        "first_token": statistics.median(r.to_first for r in replies if r.first is not None),
        "frames_per_reply": statistics.median(len(r.seqs) for r in replies),
        "tokens_per_frame": statistics.median(t / max(1, len(r.seqs)) for t, r in zip(tokens, replies)),
        "errors": sum(not r.ok for r in replies),
        "seq_gaps": sum(not r.gapless for r in replies),
        "text_mismatches": sum(r.text != expected for r in replies),
        "peak_streams": stack.fake_stats("ollama")["peak_concurrency"],
    }


async def floor(url: str, conversations: int) -> dict:
    client = ollama.AsyncClient(host=url)

    async def one():
        sent = time.perf_counter()
        first, count = None, 0
        async for part in await client.chat(model=UPSTREAM, stream=True,
                                            messages=[{"role": "user", "content": "Tell me a long story"}]):
            if part.message.content:
                first = first or time.perf_counter()
                count += 1
            if part.done:
                break
        return count, first - sent, time.perf_counter() - sent

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(conversations)))
    wall = time.perf_counter() - started
    return {"wall": wall, "tokens": sum(r[0] for r in results),
            "aggregate_tps": sum(r[0] for r in results) / wall,
            "per_conversation_tps": statistics.median(r[0] / r[2] for r in results),
            "first_token": statistics.median(r[1] for r in results)}


async def measure(stack: BenchStack, args) -> dict:
    mark("streaming")
    results = {}
    for label, pace, tokens in (("paced", args.pace, args.tokens), ("unpaced", 0.0, args.unpaced_tokens)):
        expected = reply_text(tokens)
        stack.fake_config("ollama", reply=expected, token_delay=pace)
        await ours(stack, 2, expected)  # warm-up (owner change, clients, threads)
        for conversations in (1, args.many):
            runs = {"ours": [], "floor": []}
            for _ in range(args.repeats):
                stack.fake_config("ollama", reply=expected, token_delay=pace)  # resets the fake's stats
                runs["ours"].append(await ours(stack, conversations, expected))
                stack.fake_config("ollama", reply=expected, token_delay=pace)
                runs["floor"].append(await floor(stack.fakes["ollama"], conversations))
                runs["floor"][-1]["peak_streams"] = stack.fake_stats("ollama")["peak_concurrency"]
            results[f"{label}, {conversations} conversation{'s' if conversations > 1 else ''}"] = {
                "pace_seconds": pace, "tokens": tokens, "conversations": conversations, **runs}
            print(f"  {label} x{conversations}: {runs['ours'][-1]['aggregate_tps']:.0f} tokens/s "
                  f"(floor {runs['floor'][-1]['aggregate_tps']:.0f})", flush=True)
    stack.fake_config("ollama", reply="Hello from fake Ollama.", token_delay=0.0)  # as the next benchmark expects
    return results


def summarize(results: dict) -> dict:
    out = {}
    for name, r in results.items():
        fig = {}
        for key in ("aggregate_tps", "per_conversation_tps", "first_token", "wall"):
            o = [x[key] for x in r["ours"]]
            f = [x[key] for x in r["floor"]]
            fig[key] = {"ours": spread(o), "floor": spread(f), "ratio": spread([a / b for a, b in zip(o, f)])}
        for key in ("frames_per_reply", "tokens_per_frame", "peak_streams"):
            fig[key] = spread([x[key] for x in r["ours"]])
        fig["floor_peak_streams"] = spread([x["peak_streams"] for x in r["floor"]])
        for key in ("errors", "seq_gaps", "text_mismatches"):
            fig[key] = sum(x[key] for x in r["ours"])
        fig["replies"] = r["conversations"] * len(r["ours"])
        out[name] = fig
    return out


def tables_make(summary: dict, args) -> list[dict]:
    rows = []
    for name, fig in summary.items():
        tps, per, first = fig["aggregate_tps"], fig["per_conversation_tps"], fig["first_token"]
        rows += [
            [name, "tokens/s, all conversations", fmt(tps["ours"], "", digits=0), fmt(tps["floor"], "", digits=0),
             fmt(tps["ratio"], "x", digits=2)],
            ["", "tokens/s per conversation", fmt(per["ours"], "", digits=0), fmt(per["floor"], "", digits=0),
             fmt(per["ratio"], "x", digits=2)],
            ["", "first token", fmt(first["ours"], " ms", 1000), fmt(first["floor"], " ms", 1000), ""],
            ["", "frames per reply (tokens per frame)",
             f"{fmt(fig['frames_per_reply'], '', digits=0)} ({fig['tokens_per_frame']['median']:.1f})", "", ""],
            ["", "streams open at once at the fake", fmt(fig["peak_streams"], "", digits=0),
             fmt(fig["floor_peak_streams"], "", digits=0), ""],
            ["", "seq gaps / text mismatches / errors",
             f"{fig['seq_gaps']} / {fig['text_mismatches']} / {fig['errors']} of {fig['replies']} replies", "", ""],
        ]
    return [{"title": f"streaming: {args.tokens} tokens at {1 / args.pace:.0f} tokens/s (paced) and "
                      f"{args.unpaced_tokens} tokens as fast as the fake writes (unpaced); median (min…max)",
             "header": ["run", "figure", "ours (to the browser)", "floor: ollama client direct", "ours ÷ floor"],
             "rows": rows}]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--pace", type=float, default=0.01, help="seconds between tokens in the paced run")
    parser.add_argument("--unpaced-tokens", type=int, default=1000)
    parser.add_argument("--many", type=int, default=50, help="conversations at once")
    parser.add_argument("--asgi", default="uvicorn")
    parser.add_argument("--keep", action="store_true")
    return parser


def report(raw: dict, args) -> None:
    notes = ["each conversation is its own websocket; tokens are the fake's whitespace-separated words",
             "the CPU worker runs Celery's gevent pool (`-P gevent -c 1000`, make run): every external "
             "reply streams at once (bench/concurrency.py for hundreds)"]
    results_write("streaming", tables=tables_make(summarize(raw), args),
                  figures={"summary": summarize(raw), "raw": raw,
                           "params": {k: v for k, v in vars(args).items() if k != "keep"}}, notes=notes)


def main() -> None:
    one_stack_main(parser(), measure, report)


if __name__ == "__main__":
    main()
