"""dispatch: websocket send → first `chat.delta` and → `chat.done` through the
real stack, to a fake Ollama that answers at once (issue 6, item 2).

    .venv/bin/python bench/dispatch.py [--asgi uvicorn,daphne] [--repeats 3]

Per ASGI server, each on a fresh stack of its own (bench/stack.py), both
up at once and the repeats interleaved between them, each run repeated:

- 1 socket sending one message at a time;
- 10 and 50 sockets each sending back to back (closed loop: messages/s);
- an open loop: `--rate` messages/s spread over 10 sockets, latency counted
  from when each message was due, so that a backlog shows as latency.

The floor is the same request made directly with the `ollama` client
(AsyncClient, one client reused) to the same fake, in the same pattern and
the same run. "Added" is ours − floor, per repeat, per percentile.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import re
import sqlite3
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ollama  # noqa: E402

from bench.common import fmt, mark, percentile, results_write, spread  # noqa: E402
from bench.stack import BenchStack, stacks_started  # noqa: E402

MODEL = "ollama_qwen:7b"
UPSTREAM = "qwen:7b"
CONTENT = "Hello there"
PCTS = (50, 95, 99)


# --- one run = a list of (to_first, to_done) seconds and the wall time ------

class Ours:
    """Messages through the stack, over websockets."""

    def __init__(self, stack: BenchStack):
        self.stack = stack

    async def sockets(self, n: int):
        return [await self.stack.connect() for _ in range(n)]

    async def closed(self, sockets: int, each: int) -> dict:
        conns = await self.sockets(sockets)
        samples = []

        async def loop(conn):
            for _ in range(each):
                reply = await conn.ask(MODEL, CONTENT)
                samples.append(reply)

        started = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in conns))
        wall = time.perf_counter() - started
        await asyncio.gather(*(c.close() for c in conns))
        self.last = samples
        return _run(samples, wall)

    async def open(self, sockets: int, rate: float, seconds: float) -> dict:
        conns = await self.sockets(sockets)
        replies = []
        started = time.perf_counter()
        for i in range(int(rate * seconds)):
            due = started + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            replies.append(await conns[i % sockets].send(MODEL, CONTENT, due=due))
        await asyncio.wait_for(asyncio.gather(*(r.finished.wait() for r in replies)), 120)
        wall = time.perf_counter() - started
        await asyncio.gather(*(c.close() for c in conns))
        return _run(replies, wall)


class Floor:
    """The same request made directly with the official client."""

    def __init__(self, url: str):
        self.client = ollama.AsyncClient(host=url)

    async def one(self, due: float | None = None):
        sent = due if due is not None else time.perf_counter()
        first = None
        stream = await self.client.chat(model=UPSTREAM, messages=[{"role": "user", "content": CONTENT}],
                                        stream=True, options={"num_predict": 256, "temperature": 0.7})
        async for part in stream:
            if first is None and part.message.content:
                first = time.perf_counter()
            if part.done:
                break
        return _Sample(first - sent, time.perf_counter() - sent)

    async def closed(self, sockets: int, each: int) -> dict:
        samples = []

        async def loop():
            for _ in range(each):
                samples.append(await self.one())

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(sockets)))
        return _run(samples, time.perf_counter() - started)

    async def open(self, sockets: int, rate: float, seconds: float) -> dict:
        tasks = []
        started = time.perf_counter()
        for i in range(int(rate * seconds)):
            due = started + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(self.one(due)))
        samples = await asyncio.gather(*tasks)
        return _run(samples, time.perf_counter() - started)


class _Sample:
    def __init__(self, to_first: float, to_done: float):
        self.to_first, self.to_done, self.ok = to_first, to_done, True


def _run(samples, wall: float) -> dict:
    ok = [s for s in samples if s.ok and s.to_first is not None]
    first = [s.to_first for s in ok]
    done = [s.to_done for s in ok]
    return {"messages": len(samples), "errors": len(samples) - len(ok), "wall": wall,
            "per_second": len(samples) / wall,
            **{f"first_p{q}": percentile(first, q) for q in PCTS},
            **{f"done_p{q}": percentile(done, q) for q in PCTS}}


# --- the scenarios ------------------------------------------------------------

def scenarios(args) -> list[tuple[str, str, tuple]]:
    return [
        ("1 socket, one message at a time", "closed", (1, args.sequential)),
        ("10 sockets, back to back", "closed", (10, args.each10)),
        ("50 sockets, back to back", "closed", (50, args.each50)),
        (f"open loop, {args.rate:g} msg/s over 10 sockets", "open", (10, args.rate, args.open_seconds)),
    ]


async def measure(stacks: dict[str, BenchStack], args) -> dict:
    """Every scenario on every stack, repeats interleaved across the stacks
    (uvicorn, daphne, uvicorn, ...) so that a change in the machine's load
    during the run does not favour one ASGI server."""
    mark("dispatch")
    ours = {asgi: Ours(stack) for asgi, stack in stacks.items()}
    floor = Floor(next(iter(stacks.values())).fakes["ollama"])
    # Warm-up: worker threads, their database connections and HTTP clients,
    # the model catalog, the GPU owner change to Ollama.
    for o in ours.values():
        await o.closed(1, 10)
        await o.closed(16, 3)
    await floor.closed(10, 5)
    results = {asgi: {} for asgi in stacks}
    for name, kind, params in scenarios(args):
        runs = {asgi: {"ours": [], "floor": []} for asgi in stacks}
        redis_before = {asgi: _redis_calls(stack) for asgi, stack in stacks.items()}
        for _ in range(args.repeats):
            for asgi in stacks:
                runs[asgi]["ours"].append(await getattr(ours[asgi], kind)(*params))
                runs[asgi]["floor"].append(await getattr(floor, kind)(*params))
        for asgi, stack in stacks.items():
            results[asgi][name] = runs[asgi]
            if name.startswith("1 socket"):
                results[asgi]["_breakdown"] = breakdown(stack, ours[asgi].last)
                sent = sum(r["messages"] for r in runs[asgi]["ours"])
                calls = {k: (v - redis_before[asgi].get(k, 0)) / sent for k, v in _redis_calls(stack).items()}
                results[asgi]["_redis_per_message"] = dict(
                    sorted(((k, v) for k, v in calls.items() if v >= 0.05), key=lambda kv: -kv[1]))
            print(f"  {asgi}: {name}: {runs[asgi]['ours'][-1]['per_second']:.0f} msg/s, "
                  f"first p50 {runs[asgi]['ours'][-1]['first_p50'] * 1000:.1f} ms", flush=True)
    return results


# --- where the time of one message goes ------------------------------------

def _redis_calls(stack: BenchStack) -> dict[str, int]:
    """Commands Redis has served, by name (INFO commandstats)."""
    import redis

    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}
    finally:
        client.close()


_TASK_LINE = re.compile(r"message=(\d+)\] Task workers\.tasks\.(\w+)\[[^]]*\] succeeded in ([\d.e-]+)s")


def breakdown(stack: BenchStack, replies) -> dict:
    """Median milliseconds of each stage of the 1-socket messages, from the
    client's clock, the reply's timestamps in the database and the workers'
    "succeeded in" log lines (same machine, same clock)."""
    offset = time.time() - time.perf_counter()  # perf_counter → Unix time
    ids = {r.message: r for r in replies if r.ok}
    db = sqlite3.connect(stack.var / "db.sqlite3")
    rows = db.execute(f"SELECT id, queued_at, started_at, first_token_at, finished_at FROM chat_message "
                      f"WHERE id IN ({','.join('?' * len(ids))})", list(ids)).fetchall()
    db.close()
    tasks: dict[tuple[int, str], float] = {}
    for log in [stack.var / "gpu-worker.log", *sorted(stack.var.glob("cpu-worker*.log"))]:
        for m in _TASK_LINE.finditer(log.read_text(errors="replace")):
            tasks[int(m[1]), m[2]] = float(m[3])

    def unix(stamp: str) -> float:
        return datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.timezone.utc).timestamp()

    stages: dict[str, list[float]] = {}
    for pk, queued, started, first, finished in rows:
        r = ids[pk]
        sent, got_first, done = r.sent + offset, r.first + offset, r.done + offset
        marks = [("socket → consumer → message stored (queued_at)", sent, unix(queued)),
                 ("→ a worker starts the reply (started_at)", unix(queued), unix(started)),
                 ("→ CPU worker sent the first delta (first_token_at)", unix(started), unix(first)),
                 ("→ the first delta reaches the socket", unix(first), got_first),
                 ("→ chat.done reaches the socket", got_first, done)]
        for label, a, b in marks:
            stages.setdefault(label, []).append(b - a)
        for task in ("gpu_acquire", "cpu_generate"):
            if (pk, task) in tasks:
                stages.setdefault(f"{task} task run time (worker log)", []).append(tasks[pk, task])
        stages.setdefault("send → chat.accepted", []).append(r.accepted - r.sent)
        stages.setdefault("send → first delta (total)", []).append(r.first - r.sent)
    return {label: statistics.median(values) for label, values in stages.items()}


def summarize(results: dict) -> dict:
    out = {}
    for name, runs in results.items():
        if name.startswith("_"):
            out[name] = runs
            continue
        fig = {}
        for key in [f"first_p{q}" for q in PCTS] + [f"done_p{q}" for q in PCTS] + ["per_second"]:
            ours = [r[key] for r in runs["ours"]]
            floor = [r[key] for r in runs["floor"]]
            fig[key] = {"ours": spread(ours), "floor": spread(floor),
                        "added": spread([o - f for o, f in zip(ours, floor)])}
        fig["errors"] = sum(r["errors"] for r in runs["ours"])
        fig["messages"] = sum(r["messages"] for r in runs["ours"])
        out[name] = fig
    return out


def _ms(stat, sign=False) -> str:
    return fmt(stat, " ms", 1000, 1, sign)


def tables_make(summary: dict, asgi_list: list[str]) -> list[dict]:
    tables = []
    for asgi in asgi_list:
        rows = []
        for name, fig in summary[asgi].items():
            if name.startswith("_"):
                continue
            for q in PCTS:
                for what, label in (("first", "→ first delta"), ("done", "→ done")):
                    f = fig[f"{what}_p{q}"]
                    rows.append([name if not rows or rows[-1][0] != name and q == 50 and what == "first" else "",
                                 f"{label} p{q}", _ms(f["ours"]), _ms(f["floor"]), _ms(f["added"], True)])
            ps = fig["per_second"]
            rows.append(["", "messages/s", fmt(ps["ours"], "", digits=0), fmt(ps["floor"], "", digits=0),
                         f"{ps['ours']['median'] / ps['floor']['median']:.2f}x of the floor"])
            if fig["errors"]:
                rows.append(["", "errors", f"{fig['errors']} of {fig['messages']}", "", ""])
        # One label per scenario, on its first row.
        seen = set()
        for row in rows:
            if row[0] in seen:
                row[0] = ""
            seen.add(row[0])
        tables.append({"title": f"dispatch via {asgi}: median (min…max) over repeats",
                       "header": ["run", "figure", "ours", "floor: ollama client direct", "added (ours − floor)"],
                       "rows": rows})
    if len(asgi_list) > 1:
        names = [n for n in summary[asgi_list[0]] if not n.startswith("_")]
        rows = []
        for name in names:
            for key, label in (("first_p50", "added → first delta p50"), ("first_p99", "added → first delta p99"),
                               ("per_second", "messages/s")):
                cells = [_ms(summary[a][name][key]["added"], True) if key != "per_second"
                         else fmt(summary[a][name][key]["ours"], "", digits=0) for a in asgi_list]
                rows.append([name, label, *cells])
        seen = set()
        for row in rows:
            if row[0] in seen:
                row[0] = ""
            seen.add(row[0])
        tables.insert(0, {"title": "dispatch: ASGI servers side by side",
                          "header": ["run", "figure", *asgi_list], "rows": rows})
    rows = [[label, *(f"{summary[a]['_breakdown'].get(label, float('nan')) * 1000:.1f} ms" for a in asgi_list)]
            for label in summary[asgi_list[0]]["_breakdown"]]
    total = {a: sum(summary[a]["_redis_per_message"].values()) for a in asgi_list}
    rows.append(["Redis commands per message (INFO commandstats)", *(f"{total[a]:.0f}" for a in asgi_list)])
    first = summary[asgi_list[0]]["_redis_per_message"]
    for command in list(first)[:8]:
        rows.append([f"  {command}", *(f"{summary[a]['_redis_per_message'].get(command, 0):.1f}"
                                       for a in asgi_list)])
    tables.append({"title": "dispatch: where one message's time goes (1 socket, last repeat, medians)",
                   "header": ["stage", *asgi_list], "rows": rows})
    return tables


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asgi", default="uvicorn,daphne")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=30, help="messages per repeat, 1 socket")
    parser.add_argument("--each10", type=int, default=10, help="messages per socket per repeat, 10 sockets")
    parser.add_argument("--each50", type=int, default=3, help="messages per socket per repeat, 50 sockets")
    parser.add_argument("--rate", type=float, default=20.0, help="open loop: messages per second")
    parser.add_argument("--open-seconds", type=float, default=3.0)
    parser.add_argument("--keep", action="store_true", help="keep the stacks' var directories (logs)")
    return parser


def report(raw: dict, starts: dict, args) -> None:
    asgi_list = list(raw)
    summary = {asgi: summarize(raw[asgi]) for asgi in asgi_list}
    notes = [f"{MODEL} through websocket → Channels → the GPU scheduler's admission (Ollama holds the GPU: "
             f"the lease at once, no gpu_acquire) → Celery cpu_generate (cpu queue) → fake Ollama → channel layer "
             f"→ websocket; every message opens a new conversation",
             "the load generator, the web server, both workers, Redis and the fake share the same cores"]
    if len(asgi_list) > 1:
        key = "1 socket, one message at a time"
        faster = min(asgi_list, key=lambda a: summary[a][key]["first_p50"]["added"]["median"])
        notes.append(f"faster at one socket (added p50 to first delta): {faster}")
    results_write("dispatch", tables=tables_make(summary, asgi_list),
                  figures={"summary": summary, "raw": raw, "stack_start_seconds": starts,
                           "params": {k: v for k, v in vars(args).items() if k != "keep"}}, notes=notes)


def main() -> None:
    args = parser().parse_args()
    with stacks_started(args.asgi.split(","), keep=args.keep) as stacks:
        raw = asyncio.run(measure(stacks, args))
    report(raw, {asgi: stack.start_seconds for asgi, stack in stacks.items()}, args)


if __name__ == "__main__":
    main()
