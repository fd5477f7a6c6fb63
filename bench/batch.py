"""batch: lines per second of a 2,000-line external batch, and GPU switches
of a mixed batch against the count in arrival order (issue 6, item 4).

    .venv/bin/python bench/batch.py [--lines 2000] [--mixed-lines 30] [--window N] [--cpu-workers N]
                                    [--probe MODEL[,MODEL]]

The batch itself is measured by bench/batch_throughput.py (written with the
batch API; it starts its own stack and runs the lines through the batch
services that POST /v1/batches uses); this wrapper runs it twice and reads
its summary lines:

- external: `--lines` lines to ollama_qwen:7b and openai_gpt-4o-mini;
  the floor is the same requests made directly with the `ollama` and
  `openai` clients to the same fakes, as many at once as the batch window;
- mixed: `--mixed-lines` lines that also use local_demo, run in arrival
  order and grouped by GPU owner (`--compare`): the GPU switches of each.

The external run also reports the lines in flight (sampled against the
window: a mean far below it says the batch's dispatching, not the window,
set the pace). `--window` runs it with BATCH_MAX_IN_FLIGHT=N (the floor
then uses as many at once), `--cpu-workers` with another number of CPU
worker processes than `make run`'s, and `--probe` sends interactive messages to those
models during the external batch and before it (their latency, idle and
during the batch: what the window costs the people chatting; local_demo
probes also switch the GPU away from Ollama, so they slow the batch).

Where bench/batch_throughput.py is missing or fails, the result says
"not available" and why.
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import mark, results_write  # noqa: E402

SCRIPT = ROOT / "bench" / "batch_throughput.py"
EXTERNAL = ("ollama_qwen:7b", "openai_gpt-4o-mini")
#: bench/batch_throughput.py's default seed: the floor draws the same mix.
SEED = 2000
TIMEOUT = 600

_HEADER = re.compile(r"^(?P<lines>\d+) lines \((?P<mix>[^)]*)\), (?P<changes>\d+) model changes.*window (?P<window>\d+)")
_RUN = re.compile(r"^(?P<order>\w+)\s*: (?P<status>\w+), (?P<completed>\d+) completed, (?P<failed>\d+) failed in "
                  r"(?P<seconds>[\d.]+) s = (?P<lps>[\d.]+) lines/s; switches (?P<switches>\{[^}]*\}) "
                  r"\(fewest owner changes possible: (?P<fewest>\d+)\)")
_IN_FLIGHT = re.compile(r"^lines in flight: mean (?P<mean>[\d.]+), most (?P<most>\d+)")
_PROBE = re.compile(r"^probe (?P<model>\S+)\s+(?P<phase>\w+)\s*: (?P<n>\d+) replies, median (?P<median>\d+) ms, "
                    r"max (?P<max>\d+) ms \((?P<statuses>\{[^}]*\})\)")


def run_script(argv: list[str], env: dict | None = None) -> dict:
    """Run batch_throughput.py; its header and one summary per order (with
    the lines in flight of each), and the probes' latencies."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})})
    out = {"argv": argv, "env": env or {}, "seconds": time.monotonic() - started, "runs": {}, "probes": []}
    order = None
    for line in proc.stdout.splitlines():
        if m := _IN_FLIGHT.match(line.strip()):
            if order is not None:
                out["runs"][order]["in_flight"] = {"mean": float(m["mean"]), "most": int(m["most"])}
            continue
        if m := _PROBE.match(line.strip()):
            out["probes"].append({"model": m["model"], "phase": m["phase"], "replies": int(m["n"]),
                                  "median_ms": int(m["median"]), "max_ms": int(m["max"]),
                                  "statuses": ast.literal_eval(m["statuses"])})
            continue
        if m := _HEADER.match(line):
            out["header"] = {**m.groupdict(), "window": int(m["window"]), "changes": int(m["changes"])}
        elif m := _RUN.match(line.strip()):
            run = m.groupdict()
            order = run["order"]
            out["runs"][run["order"]] = {
                "status": run["status"], "completed": int(run["completed"]), "failed": int(run["failed"]),
                "seconds": float(run["seconds"]), "lines_per_second": float(run["lps"]),
                "switches": ast.literal_eval(run["switches"]), "fewest_owner_changes": int(run["fewest"])}
    if proc.returncode != 0 or not out["runs"]:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"bench/batch_throughput.py {' '.join(argv)} exited {proc.returncode}: "
                           + " | ".join(tail))
    return out


async def floor(urls: dict, *, lines: int, window: int) -> dict:
    """The batch's requests made directly, `window` at a time."""
    import ollama
    import openai

    rng = random.Random(SEED)
    models = [rng.choice(EXTERNAL) for _ in range(lines)]
    o = ollama.AsyncClient(host=urls["ollama"])
    a = openai.AsyncOpenAI(base_url=urls["openai"] + "/v1", api_key=urls["openai_key"], max_retries=0)
    queue = list(enumerate(models))

    async def worker():
        while queue:
            i, model = queue.pop()
            messages = [{"role": "user", "content": f"question {i}"}]
            if model.startswith("ollama_"):
                await o.chat(model=model.removeprefix("ollama_"), messages=messages)
            else:
                await a.chat.completions.create(model=model.removeprefix("openai_"), messages=messages)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(window)))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "lines_per_second": lines / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--mixed-lines", type=int, default=30,
                        help="in arrival order every model change is a GPU switch: seconds each on 2 cores")
    parser.add_argument("--window", type=int, default=None,
                        help="BATCH_MAX_IN_FLIGHT for the external batch (default: the settings')")
    parser.add_argument("--cpu-workers", type=int, default=None,
                        help="CPU worker processes (default: make run's, settings.CPU_WORKER_PROCESSES)")
    parser.add_argument("--probe", default="",
                        help="models to send interactive messages to during the external batch, e.g. "
                             "openai_gpt-4o-mini,local_demo")
    args = parser.parse_args()
    mark("batch")
    figures: dict = {"params": vars(args)}
    rows, notes = [], []
    if not SCRIPT.exists():
        figures["available"] = False
        notes.append("not available: bench/batch_throughput.py (from the batch API work) is not in this checkout")
        rows.append(["external batch", "lines/s", "not available", "", ""])
    else:
        figures["available"] = True
        try:
            extra = (["--cpu-workers", str(args.cpu_workers)] if args.cpu_workers else []) + \
                (["--probe", args.probe] if args.probe else [])
            external = run_script(["--lines", str(args.lines), "--models", ",".join(EXTERNAL), *extra],
                                  env={"BATCH_MAX_IN_FLIGHT": str(args.window)} if args.window else None)
            from bench.stack import Fakes

            with tempfile.TemporaryDirectory(prefix="chat-bench-batch-") as var:
                fakes = Fakes(Path(var)).start()
                try:
                    floor_run = asyncio.run(floor(fakes.urls, lines=args.lines,
                                                  window=external["header"]["window"]))
                finally:
                    fakes.stop()
            grouped = external["runs"]["grouped"]
            figures["external"] = {**external, "floor": floor_run}
            rows += [
                [f"external batch, {args.lines} lines ({external['header']['mix']})", "lines/s",
                 f"{grouped['lines_per_second']:.1f}", f"{floor_run['lines_per_second']:.0f}",
                 f"{grouped['lines_per_second'] / floor_run['lines_per_second']:.2f}x"],
                ["", "completed / failed", f"{grouped['completed']} / {grouped['failed']}", "", ""],
            ]
            if "in_flight" in grouped:
                rows.append(["", "lines in flight: mean / most", f"{grouped['in_flight']['mean']:.1f} / "
                             f"{grouped['in_flight']['most']}", f"window {external['header']['window']}", ""])
            for probe in external["probes"]:
                rows.append(["", f"interactive {probe['model']}, {probe['phase']}", f"{probe['median_ms']} ms",
                             "", f"max {probe['max_ms']} ms, {probe['replies']} replies {probe['statuses']}"])
        except (RuntimeError, subprocess.TimeoutExpired, KeyError) as exc:
            figures["external"] = {"error": str(exc)}
            rows.append(["external batch", "lines/s", "not available", "", str(exc)[:120]])
            notes.append(f"external batch not available: {exc}")
        try:
            mixed = run_script(["--lines", str(args.mixed_lines), "--compare"])
            figures["mixed"] = mixed
            arrival, grouped = mixed["runs"]["arrival"], mixed["runs"]["grouped"]
            label = f"mixed batch, {args.mixed_lines} lines ({mixed['header']['mix']})"
            for key in ("owner_change", "local_unload", "local_load", "ollama_unload"):
                rows.append([label if key == "owner_change" else "", f"GPU switches: {key}",
                             str(grouped["switches"].get(key, "?")), str(arrival["switches"].get(key, "?")),
                             f"fewest possible owner changes: {grouped['fewest_owner_changes']}"
                             if key == "owner_change" else ""])
            rows.append(["", "lines/s", f"{grouped['lines_per_second']:.1f}", f"{arrival['lines_per_second']:.1f}",
                         f"{grouped['lines_per_second'] / arrival['lines_per_second']:.2f}x"])
        except (RuntimeError, subprocess.TimeoutExpired, KeyError) as exc:
            figures["mixed"] = {"error": str(exc)}
            rows.append(["mixed batch", "GPU switches", "not available", "", str(exc)[:120]])
            notes.append(f"mixed batch not available: {exc}")
        notes.append("one run each (a 2,000-line batch is the repeat); the batch runs on its own stack, "
                     "started by bench/batch_throughput.py")
    results_write("batch", tables=[{
        "title": "batch: ours vs floor (external) and grouped vs arrival order (mixed)",
        "header": ["run", "figure", "ours (grouped by GPU owner)", "floor: clients direct / arrival order",
                   "ratio / note"],
        "rows": rows}], figures=figures, notes=notes)


if __name__ == "__main__":
    main()
