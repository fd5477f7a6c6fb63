"""`make bench`: every benchmark, each printing its table and writing
bench/results/NAME.json (docs/BENCHMARKS.md says what each measures).

    .venv/bin/python bench/all.py

To keep it to ~16 minutes on 2 cores, the benchmarks that go through the
stack share it: a uvicorn stack and a daphne stack run dispatch side by
side, then the uvicorn one (`make run`'s server) serves streaming, local
generation and concurrency (on one of its CPU worker processes). Each script
also runs on its own (`bench/dispatch.py --help`, ...), with its own stack.
`switch_load` (issue 13, 7.5-10 minutes) comes last, with a stack of its
own that it restarts under each GPU_SCHEDULE.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import concurrency, dispatch, local_generation, streaming  # noqa: E402
from bench.stack import stacks_started  # noqa: E402


def step(name: str, seconds: dict, started: float) -> None:
    seconds[name] = time.monotonic() - started
    print(f"[{name}: {seconds[name]:.0f} s]", flush=True)


def main() -> None:
    seconds: dict[str, float] = {}
    began = time.monotonic()

    started = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "bench" / "swap.py")], check=True)
    step("swap", seconds, started)

    d_args, s_args, l_args, c_args = (m.parser().parse_args([])
                                      for m in (dispatch, streaming, local_generation, concurrency))
    started = time.monotonic()
    with stacks_started(["uvicorn", "daphne"]) as stacks:
        raw = asyncio.run(dispatch.measure(stacks, d_args))
        step("dispatch (uvicorn and daphne)", seconds, started)
        stack = stacks["uvicorn"]  # `make run`'s server
        started = time.monotonic()
        streaming_raw = asyncio.run(streaming.measure(stack, s_args))
        step("streaming", seconds, started)
        started = time.monotonic()
        local_raw = local_generation.measure(stack, l_args)
        step("local generation", seconds, started)
        started = time.monotonic()
        concurrency_raw = asyncio.run(concurrency.measure(stack, c_args))
        step("concurrency", seconds, started)
    dispatch.report(raw, {asgi: s.start_seconds for asgi, s in stacks.items()}, d_args)
    streaming.report(streaming_raw, s_args)
    local_generation.report(local_raw, l_args)
    concurrency.report(concurrency_raw, c_args)

    started = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "bench" / "batch.py")], check=True)
    step("batch", seconds, started)

    started = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "bench" / "switch_load.py")], check=True)
    step("switch_load", seconds, started)
    total = time.monotonic() - began
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f"; total {total / 60:.1f} min")


if __name__ == "__main__":
    main()
