"""concurrency: external replies streaming at once from one CPU worker
process, and what each open stream and socket costs (issue 14).

    .venv/bin/python bench/concurrency.py [--streams 500] [--paced 200]

Two runs through the real stack (bench/stack.py, `make run`'s processes),
each conversation on its own websocket (a browser tab):

- wide: `--streams` replies at once, paced slowly (`--wide-rate` tokens/s,
  `--wide-tokens` tokens each), so that all of them are open together: the
  point is concurrency, not bandwidth. The fake Ollama counts the streams
  it holds open at once; the CPU worker's and the web process's resident
  memory are sampled while they are, against the same processes idle with
  the sockets open (per socket) and before (per stream: worker and web).
- paced: `--paced` conversations at `--paced-rate` tokens/s each
  (`--paced-tokens` each: a 10 s reply), against the floor: the same
  streams read directly with the `ollama` client (AsyncClient, one per run)
  from the same fake in the same run;
- killed: `--killed` Ollama replies streaming when the CPU worker is
  SIGKILLed: each must end exactly once (the GPU worker reaps their leases
  and ends them with `worker_lost`).

Every reply is checked: it ends in `chat.done`, its deltas are numbered
0..n-1 and their text is what the fake sent.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ollama  # noqa: E402

from bench.common import mark, results_write  # noqa: E402
from bench.stack import BenchStack, one_stack_main  # noqa: E402
from bench.streaming import MODEL, UPSTREAM, reply_text  # noqa: E402


def rss_kib(pid: int) -> int:
    """Resident memory of a process (KiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class RssPeak:
    """Samples the resident memory of some processes every 50 ms until stopped."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.peak = {name: rss_kib(pid) for name, pid in pids.items()}
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_kib(pid))
            await asyncio.sleep(0.05)

    def __enter__(self) -> "RssPeak":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()


def checked(replies, expected: str) -> dict:
    return {
        "replies": len(replies),
        "done": sum(r.ok for r in replies),
        "seq_gaps": sum(not r.gapless for r in replies),
        "text_mismatches": sum(r.text != expected for r in replies),
    }


async def sockets_open(stack: BenchStack, n: int) -> list:
    conns = []
    for start in range(0, n, 50):  # 50 handshakes at a time
        conns += await asyncio.gather(*(stack.connect() for _ in range(min(50, n - start))))
    return conns


async def wide(stack: BenchStack, args) -> dict:
    """`--streams` replies at once; memory per socket and per stream."""
    mark("concurrency: wide")
    expected = reply_text(args.wide_tokens)
    stack.fake_config("ollama", reply=expected, token_delay=1 / args.wide_rate)
    warm = await stack.connect()
    await warm.ask(MODEL, "warm up")  # the owner change, the clients, the first greenlets
    await warm.close()
    pids = {"cpu-worker": stack.procs["cpu-worker"].pid, "web": stack.procs["web"].pid}
    await asyncio.sleep(1.0)
    idle = {name: rss_kib(pid) for name, pid in pids.items()}
    conns = await sockets_open(stack, args.streams)
    await asyncio.sleep(1.0)
    with_sockets = {name: rss_kib(pid) for name, pid in pids.items()}
    stack.fake_config("ollama", reply=expected, token_delay=1 / args.wide_rate)  # resets the fake's stats
    with RssPeak(pids) as peak:
        started = time.perf_counter()
        replies = await asyncio.gather(*(c.ask(MODEL, "Tell me a story", timeout=600) for c in conns))
        wall = time.perf_counter() - started
    await asyncio.gather(*(c.close() for c in conns))
    stats = stack.fake_stats("ollama")
    n = args.streams
    return {
        **checked(replies, expected),
        "streams": n, "tokens": args.wide_tokens, "rate": args.wide_rate, "wall": wall,
        "peak_streams_at_fake": stats["peak_concurrency"],
        "first_token_p50": statistics.median(r.to_first for r in replies if r.first is not None),
        "rss_kib": {"idle": idle, "with_sockets": with_sockets, "peak_streaming": peak.peak},
        "kib_per_socket_web": (with_sockets["web"] - idle["web"]) / n,
        "kib_per_stream_web": (peak.peak["web"] - with_sockets["web"]) / n,
        "kib_per_stream_cpu_worker": (peak.peak["cpu-worker"] - with_sockets["cpu-worker"]) / n,
    }


async def floor(url: str, conversations: int) -> dict:
    client = ollama.AsyncClient(host=url)

    async def one():
        count = 0
        async for part in await client.chat(model=UPSTREAM, stream=True,
                                            messages=[{"role": "user", "content": "Tell me a story"}]):
            count += bool(part.message.content)
            if part.done:
                break
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(conversations)))
    wall = time.perf_counter() - started
    return {"tokens": sum(counts), "wall": wall, "tokens_per_second": sum(counts) / wall}


async def paced(stack: BenchStack, args) -> dict:
    mark("concurrency: paced")
    expected = reply_text(args.paced_tokens)
    conns = await sockets_open(stack, args.paced)
    runs = {"ours": [], "floor": []}
    for _ in range(args.repeats):
        stack.fake_config("ollama", reply=expected, token_delay=1 / args.paced_rate)
        started = time.perf_counter()
        replies = await asyncio.gather(*(c.ask(MODEL, "Tell me a story", timeout=600) for c in conns))
        wall = time.perf_counter() - started
        tokens = sum(r.end.get("usage", {}).get("completion_tokens", 0) for r in replies if r.ok)
        runs["ours"].append({**checked(replies, expected), "tokens": tokens, "wall": wall,
                             "tokens_per_second": tokens / wall,
                             "peak_streams_at_fake": stack.fake_stats("ollama")["peak_concurrency"],
                             "first_token_p50": statistics.median(r.to_first for r in replies
                                                                  if r.first is not None)})
        stack.fake_config("ollama", reply=expected, token_delay=1 / args.paced_rate)
        runs["floor"].append(await floor(stack.fakes["ollama"], args.paced))
        print(f"  paced x{args.paced}: {runs['ours'][-1]['tokens_per_second']:.0f} tokens/s "
              f"(floor {runs['floor'][-1]['tokens_per_second']:.0f})", flush=True)
    await asyncio.gather(*(c.close() for c in conns))
    ratios = [o["tokens_per_second"] / f["tokens_per_second"] for o, f in zip(runs["ours"], runs["floor"])]
    return {"conversations": args.paced, "tokens": args.paced_tokens, "rate": args.paced_rate, **runs,
            "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}


async def killed(stack: BenchStack, args) -> dict:
    """`--killed` Ollama replies streaming when the CPU worker is SIGKILLed
    (then started again, as `make run` does): each must end exactly once,
    with its reply or a clear error. The GPU worker reaps their leases once
    GPU_LEASE_TTL has passed without renewal and ends each with
    `worker_lost`; after the last end, the sockets are watched for another
    `--watch` seconds for a second end of any of them."""
    mark("concurrency: killed")
    expected = reply_text(args.killed_tokens)
    stack.fake_config("ollama", reply=expected, token_delay=1 / args.wide_rate)
    conns = await sockets_open(stack, args.killed)
    replies = [await c.send(MODEL, "Tell me a story") for c in conns]
    deadline = time.monotonic() + 120
    while sum(r.first is not None for r in replies) < len(replies) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    streaming = sum(r.first is not None and r.end is None for r in replies)
    proc = stack.procs["cpu-worker"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.perf_counter()
    stack._spawn("cpu-worker", stack.argv["cpu-worker"], stack.env)
    await asyncio.wait_for(asyncio.gather(*(r.finished.wait() for r in replies)), timeout=args.killed_wait)
    last_end = max(r.done for r in replies) - killed_at
    await asyncio.sleep(args.watch)  # an observation window for second ends, not a wait for a condition
    ends = collections.Counter()
    for c in conns:
        ends.update(c.ends)
    await asyncio.gather(*(c.close() for c in conns))
    outcomes = collections.Counter(r.end["type"] if r.end["type"] == "chat.done" else r.end.get("code")
                                   for r in replies)
    return {"replies": len(replies), "streaming_when_killed": streaming,
            "ended_once": sum(ends[r.message] == 1 for r in replies),
            "ended_twice_or_more": sum(ends[r.message] > 1 for r in replies),
            "never_ended": sum(ends[r.message] == 0 for r in replies),
            "outcomes": dict(outcomes), "seconds_kill_to_last_end": last_end}


async def measure(stack: BenchStack, args) -> dict:
    # The figures are per CPU worker process (issue 14: "from one CPU
    # worker process"), and the kill is of that one process.
    with stack.cpu_workers_only(1):
        return await _measure(stack, args)


async def _measure(stack: BenchStack, args) -> dict:
    results = {"wide": await wide(stack, args)}
    w = results["wide"]
    print(f"  wide x{args.streams}: {w['peak_streams_at_fake']} open at once at the fake, "
          f"{w['done']}/{w['replies']} done, {w['kib_per_stream_cpu_worker']:.0f} KiB per stream (CPU worker)",
          flush=True)
    results["paced"] = await paced(stack, args)
    results["killed"] = await killed(stack, args)
    k = results["killed"]
    print(f"  killed with {k['streaming_when_killed']} streaming: {k['ended_once']} ended once, "
          f"{k['ended_twice_or_more']} twice, {k['never_ended']} never; {k['outcomes']}", flush=True)
    stack.fake_config("ollama", reply="Hello from fake Ollama.", token_delay=0.0)  # as the next benchmark expects
    return results


def tables_make(r: dict) -> list[dict]:
    w, p = r["wide"], r["paced"]
    ours = p["ours"]
    rows = [
        [f"wide: {w['streams']} replies, {w['tokens']} tokens at {w['rate']:g} tokens/s",
         "streams open at once at the fake", f"{w['peak_streams_at_fake']}", f"{w['streams']}"],
        ["", "done / seq gaps / text mismatches",
         f"{w['done']} / {w['seq_gaps']} / {w['text_mismatches']} of {w['replies']}", "all / 0 / 0"],
        ["", "first token p50", f"{w['first_token_p50'] * 1000:.0f} ms", ""],
        ["", "CPU worker memory per open stream", f"{w['kib_per_stream_cpu_worker']:.0f} KiB", ""],
        ["", "web memory per open socket (idle) / per stream",
         f"{w['kib_per_socket_web']:.0f} / {w['kib_per_stream_web']:.0f} KiB", ""],
        ["", "resident memory, idle → sockets open → peak (CPU worker; web)",
         f"{w['rss_kib']['idle']['cpu-worker'] / 1024:.0f} → {w['rss_kib']['with_sockets']['cpu-worker'] / 1024:.0f}"
         f" → {w['rss_kib']['peak_streaming']['cpu-worker'] / 1024:.0f} MiB; "
         f"{w['rss_kib']['idle']['web'] / 1024:.0f} → {w['rss_kib']['with_sockets']['web'] / 1024:.0f}"
         f" → {w['rss_kib']['peak_streaming']['web'] / 1024:.0f} MiB", ""],
        [f"paced: {p['conversations']} conversations, {p['tokens']} tokens at {p['rate']:g} tokens/s",
         "tokens/s delivered, ours ÷ floor (median, min…max)",
         f"{p['ratio']['median']:.2f}x ({p['ratio']['min']:.2f}…{p['ratio']['max']:.2f})", "≥ 0.8x"],
        ["", "tokens/s ours / floor (last repeat)",
         f"{ours[-1]['tokens_per_second']:.0f} / {p['floor'][-1]['tokens_per_second']:.0f}", ""],
        ["", "done / seq gaps / text mismatches (all repeats)",
         f"{sum(o['done'] for o in ours)} / {sum(o['seq_gaps'] for o in ours)} / "
         f"{sum(o['text_mismatches'] for o in ours)} of {sum(o['replies'] for o in ours)}", "all / 0 / 0"],
        ["", "streams open at once at the fake", f"{max(o['peak_streams_at_fake'] for o in ours)}",
         f"{p['conversations']}"],
        ["", "first token p50 (last repeat)", f"{ours[-1]['first_token_p50'] * 1000:.0f} ms", ""],
    ]
    k = r["killed"]
    rows += [
        [f"killed: the CPU worker SIGKILLed with {k['replies']} Ollama replies streaming",
         "streaming when killed (a delta seen, no end)", f"{k['streaming_when_killed']}",
         f"{k['replies']}"],
        ["", "ended exactly once / twice or more / never",
         f"{k['ended_once']} / {k['ended_twice_or_more']} / {k['never_ended']}", f"{k['replies']} / 0 / 0"],
        ["", "how they ended", ", ".join(f"{n} {what}" for what, n in sorted(k["outcomes"].items())), ""],
        ["", "kill → last end", f"{k['seconds_kill_to_last_end']:.1f} s", "GPU_LEASE_TTL + reaping"],
    ]
    return [{"title": "concurrency: external replies streaming at once from one CPU worker process "
                      "(`-P gevent`, make run)",
             "header": ["run", "figure", "ours", "target / floor"], "rows": rows}]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--wide-tokens", type=int, default=150)
    parser.add_argument("--wide-rate", type=float, default=5.0, help="tokens/s of each wide stream")
    parser.add_argument("--paced", type=int, default=200)
    parser.add_argument("--paced-tokens", type=int, default=200)
    parser.add_argument("--paced-rate", type=float, default=20.0, help="tokens/s of each paced stream")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--killed", type=int, default=300, help="replies streaming when the CPU worker is killed")
    parser.add_argument("--killed-tokens", type=int, default=400)
    parser.add_argument("--killed-wait", type=float, default=120.0, help="seconds for every reply to end")
    parser.add_argument("--watch", type=float, default=3.0, help="seconds to watch for a second end")
    parser.add_argument("--asgi", default="uvicorn")
    parser.add_argument("--keep", action="store_true")
    return parser


def report(raw: dict, args) -> None:
    notes = ["each conversation is its own websocket; tokens are the fake's whitespace-separated words",
             "the load generator, the web server, both workers, Redis and the fake share the same 2 cores"]
    results_write("concurrency", tables=tables_make(raw), figures={"raw": raw, "params": {
        k: v for k, v in vars(args).items() if k != "keep"}}, notes=notes)


def main() -> None:
    one_stack_main(parser(), measure, report)


if __name__ == "__main__":
    main()
