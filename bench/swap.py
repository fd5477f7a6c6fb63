"""swap: loading and unloading a ~1 GB local model, against its floors and
against the original system's way of unloading (issue 6, item 1).

    .venv/bin/python bench/swap.py [--gib 1] [--cycles 50] [--repeats 3] [--device cpu|cuda:0]

Reuses gpu_manager.selfcheck (the model, the floors, dropping the page
cache). Each unloading method runs in a fresh process of its own, so that
neither inherits the other's heap:

- **ours**: `LocalEngine.unload()` — drop the references, `gc.collect()`,
  `empty_cache()` on cuda, `malloc_trim(0)`;
- **original**: drop the engine's references, then `torch.cuda.empty_cache()`
  on cuda and nothing else on cpu (no gc.collect, no malloc_trim).

Two ways the weights can sit in memory, each measured with both methods:

- **mapped**: the service's own path (`LocalEngine.load`, dtype "auto"): on
  cpu transformers keeps the safetensors file memory-mapped (RssFile);
- **copied**: the same checkpoint loaded with a cast (bf16 in memory, fp32
  on disk), so every tensor is a fresh heap allocation, as weights on a GPU
  are fresh allocator blocks (RssAnon).

Figures: cold load + first forward ÷ reading the same bytes (page cache
dropped before each); unload seconds; memory after unload − the baseline
before loading; growth over the cycles; warm-offload reload ÷ a pinned copy
(cuda only).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import CACHE, fmt, mark, results_write, spread  # noqa: E402

MB = 1e6
#: New tokens each cycle asks generate() for: enough to run the real
#: generation path (and whatever reference cycles it leaves) at the cost of
#: one forward pass.
CYCLE_NEW_TOKENS = 1


def model_ensure(*, gib: float, dtype_name: str) -> Path:
    """The generated model, built once and kept under var/bench/ (building
    1 GB takes ~20 s on 2 cores; every later run reuses it)."""
    import torch

    from gpu_manager.selfcheck import GIB, model_build

    path = CACHE / f"llama-{gib:g}gib-{dtype_name}" / "model"
    if (path / "config.json").exists() and list(path.glob("*.safetensors")):
        return path
    staging = path.parent.with_name(path.parent.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    model_build(staging / "model", nbytes=int(gib * GIB), dtype=getattr(torch, dtype_name))
    shutil.rmtree(path.parent, ignore_errors=True)
    staging.rename(path.parent)
    print(f"built {path} in {time.monotonic() - started:.0f} s", flush=True)
    return path


# --- the child: one method, one placement, in a fresh process ---------------

def _engine(scenario: str, path: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpu_manager.engines import LocalEngine

    if scenario == "mapped":
        return LocalEngine(name="bench", path=str(path), device=device)

    class CastEngine(LocalEngine):
        def load(self) -> None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.bfloat16,
                                                              device_map=self.device).eval()

    return CastEngine(name="bench", path=str(path), device=device)


def _unload(engine, method: str) -> tuple[float, bool]:
    """Seconds to unload, and whether the model object is gone afterwards."""
    import torch

    ref = weakref.ref(engine.model)
    started = time.perf_counter()
    if method == "ours":
        engine.unload()
    else:
        # The original system: `del` on its references, then empty_cache.
        engine.model = engine.tokenizer = None
        if engine.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if engine.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started, ref() is None


def _forward(engine) -> float:
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        engine.model(torch.tensor([[1, 2, 3]], device=engine.model.device))
    if engine.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _memory(device: str) -> dict:
    """The allocator on cuda, and the process RSS split anon/file on every device."""
    from gpu_manager.memory import _rss_split, memory_snapshot

    reading = memory_snapshot(device)
    reading["rss_anon"], reading["rss_file"] = _rss_split()
    reading["rss"] = reading["rss_anon"] + reading["rss_file"]
    return reading


def _minus(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in ("allocated", "reserved", "rss", "rss_anon", "rss_file")
            if k in after and k in before}


def child(args) -> dict:
    import torch

    from gpu_manager.memory import memory_release
    from gpu_manager.selfcheck import drop_page_cache, floor_copy, floor_read

    path, device = Path(args.model), args.device
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # Warm-up on the small model beside it: imports the model classes and
    # sets up the allocator, so that the baseline is a steady state.
    warm = _engine("mapped", path.parent / "tokenizer-source", device)
    warm.load()
    _forward(warm)
    _unload(warm, args.method)
    memory_release(device)  # the same clean baseline for both methods
    baseline = _memory(device)
    result = {"method": args.method, "scenario": args.scenario, "device": device, "weights_bytes": weights,
              "baseline": baseline, "cold": [], "cycles": []}

    for _ in range(args.repeats):  # cold load vs reading the same bytes
        dropped = drop_page_cache()
        floor = floor_read(path, device)
        memory_release(device)
        drop_page_cache()
        engine = _engine(args.scenario, path, device)
        started = time.perf_counter()
        engine.load()
        _forward(engine)
        cold = time.perf_counter() - started
        compute = _forward(engine)  # the same forward, weights resident: the compute part
        loaded = _memory(device)
        seconds, dead = _unload(engine, args.method)
        del engine
        result["cold"].append({"page_cache_dropped": dropped, "floor_seconds": floor, "cold_seconds": cold,
                               "forward_seconds": compute, "loaded": _minus(loaded, baseline),
                               "unload_seconds": seconds, "dead": dead,
                               "after": _minus(_memory(device), baseline)})

    for _ in range(args.cycles):  # steady state: load, generate, unload
        engine = _engine(args.scenario, path, device)
        engine.load()
        engine.generate([{"role": "user", "content": "Hello there"}], max_new_tokens=CYCLE_NEW_TOKENS,
                        temperature=0.0, top_p=1.0, on_text=lambda text: None, should_stop=lambda: False)
        seconds, dead = _unload(engine, args.method)
        del engine
        result["cycles"].append({"unload_seconds": seconds, "dead": dead,
                                 "after": _minus(_memory(device), baseline)})

    if args.method == "original" and result["cycles"]:
        # What our extra steps would still recover, and what each costs.
        from gpu_manager.memory import _malloc_trim

        steps = {}
        for step, call in (("gc_collect", gc.collect), ("malloc_trim", _malloc_trim)):
            started = time.perf_counter()
            call()
            steps[step] = {"seconds": time.perf_counter() - started, "after": _minus(_memory(device), baseline)}
        result["extra_steps"] = steps

    if device.startswith("cuda") and args.scenario == "mapped":
        engine = _engine("mapped", path, device)
        engine.warm_offload = True
        engine.load()
        copies = [floor_copy(engine, device) for _ in range(args.repeats)]
        reloads = []
        for _ in range(args.repeats):
            engine.offload()
            started = time.perf_counter()
            engine.restore()
            reloads.append(time.perf_counter() - started)
        engine.unload()
        result["warm"] = {"copy_seconds": copies, "reload_seconds": reloads}
    result["torch"] = torch.__version__
    return result


# --- the parent: build, run the children, compare ---------------------------

#: The what-if for heap-copied weights: glibc raises its mmap threshold (up
#: to 32 MB) each time it frees a large mmapped block, so from the second
#: load on, tensors under 32 MB come from the heap, which trimming cannot
#: fully give back. A fixed threshold (env, or mallopt) turns that off.
MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_child(*, method: str, scenario: str, model: Path, device: str, cycles: int, repeats: int,
              extra_env: dict | None = None) -> dict:
    out = CACHE / f"swap-{scenario}-{method}{'-env' if extra_env else ''}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--scenario", scenario,
            "--model", str(model), "--device", device, "--cycles", str(cycles), "--repeats", str(repeats),
            "--child-out", str(out)]
    started = time.monotonic()
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", **(extra_env or {})}
    subprocess.run(argv, check=True, env=env, cwd=ROOT)
    print(f"  {scenario}/{method}{' ' + str(extra_env) if extra_env else ''}: "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return json.loads(out.read_text())


def summarize(run: dict) -> dict:
    weights = run["weights_bytes"]
    cold = run["cold"]
    cycles = run["cycles"]
    after = [c["after"] for c in cycles] or [c["after"] for c in cold]
    first = (cold or cycles)[0]["after"]
    figures = {
        "cold_ratio": spread([c["cold_seconds"] / c["floor_seconds"] for c in cold]),
        "io_ratio": spread([(c["cold_seconds"] - c["forward_seconds"]) / c["floor_seconds"] for c in cold]),
        "cold_seconds": spread([c["cold_seconds"] for c in cold]),
        "floor_seconds": spread([c["floor_seconds"] for c in cold]),
        "forward_seconds": spread([c["forward_seconds"] for c in cold]),
        "page_cache_dropped": all(c["page_cache_dropped"] for c in cold) if cold else None,
        "unload_seconds": spread([c["unload_seconds"] for c in cold + cycles]),
        "first_after": first,
        "after_rss": spread([a["rss"] for a in after]),
        "after_anon": spread([a["rss_anon"] for a in after]),
        "after_file": spread([a["rss_file"] for a in after]),
        "after_fraction": spread([a["rss"] / weights for a in after]),
        "growth": after[-1]["rss"] - after[0]["rss"],
        # From the second cycle on: a step after the first one is the heap
        # settling, growth after it would be a leak.
        "growth_steady": after[-1]["rss"] - after[min(1, len(after) - 1)]["rss"],
        "cycles": len(cycles),
        "alive": sum(not c["dead"] for c in cold + cycles),
        "unloads": len(cold + cycles),
    }
    if run["device"].startswith("cuda"):
        figures["after_allocated"] = spread([a["allocated"] for a in after])
        figures["after_reserved"] = spread([a["reserved"] for a in after])
        figures["growth_allocated"] = after[-1]["allocated"] - after[0]["allocated"]
    if "extra_steps" in run:
        figures["extra_steps"] = run["extra_steps"]
    if "warm" in run:
        figures["warm_ratio"] = spread([r / c for r, c in zip(run["warm"]["reload_seconds"],
                                                               run["warm"]["copy_seconds"])])
        figures["warm_reload_seconds"] = spread(run["warm"]["reload_seconds"])
        figures["copy_seconds"] = spread(run["warm"]["copy_seconds"])
    return figures


def _mb(stat: dict) -> str:
    return fmt(stat, " MB", 1 / MB, sign=True)


def tables_make(runs: dict, *, device: str, weights: int) -> list[dict]:
    ours, orig = runs["mapped", "ours"], runs["mapped", "original"]
    cold = ours["cold_ratio"]
    rows = [
        ["cold load + first forward", fmt(ours["cold_seconds"], " s", digits=2), "",
         f"floor: read + touch the same bytes {fmt(ours['floor_seconds'], ' s', digits=2)}"
         + ("" if ours["page_cache_dropped"] else " (page cache NOT dropped)")],
        ["  ÷ floor", fmt(cold, "x", digits=2), "", "target ≤ 1.2x"],
        ["  minus the forward's compute, ÷ floor", fmt(ours["io_ratio"], "x", digits=2), "",
         f"compute = a second forward {fmt(ours['forward_seconds'], ' s', digits=2)}"],
    ]
    for scenario in ("mapped", "copied"):
        if (scenario, "ours") not in runs:
            continue
        o, g = runs[scenario, "ours"], runs[scenario, "original"]
        label = "file-mapped weights" if scenario == "mapped" else "heap-copied weights"
        rows += [
            [f"[{label}] unload", fmt(o["unload_seconds"], " s", digits=3), fmt(g["unload_seconds"], " s", digits=3),
             f"over {o['unloads']} / {g['unloads']} unloads"],
            ["  RSS after unload − baseline", _mb(o["after_rss"]), _mb(g["after_rss"]), "target within 1% of weights"],
            ["    as % of the weights", fmt(o["after_fraction"], " %", 100, 2, True),
             fmt(g["after_fraction"], " %", 100, 2, True), ""],
            ["    of which anonymous (heap)", _mb(o["after_anon"]), _mb(g["after_anon"]), ""],
            ["    of which file-backed (mmap)", _mb(o["after_file"]), _mb(g["after_file"]), ""],
            [f"  growth over {o['cycles']} / {g['cycles']} cycles", f"{o['growth'] / MB:+.1f} MB",
             f"{g['growth'] / MB:+.1f} MB", "target: none"],
            ["    of which after the 2nd cycle", f"{o['growth_steady'] / MB:+.1f} MB",
             f"{g['growth_steady'] / MB:+.1f} MB", ""],
            ["  model alive after unload", f"{o['alive']} of {o['unloads']}", f"{g['alive']} of {g['unloads']}",
             "weakref to the model"],
        ]
        if "extra_steps" in g:
            gcs, trim = g["extra_steps"]["gc_collect"], g["extra_steps"]["malloc_trim"]
            last = g["after_rss"]["values"][-1]
            rows.append(["  then gc.collect(), then malloc_trim(0)", "",
                         f"{(gcs['after']['rss'] - last) / MB:+.1f} MB in {gcs['seconds']:.3f} s, "
                         f"{(trim['after']['rss'] - gcs['after']['rss']) / MB:+.1f} MB in {trim['seconds']:.3f} s",
                         "applied once after the last cycle"])
        if (scenario, "ours+mmap_threshold") in runs:
            w = runs[scenario, "ours+mmap_threshold"]
            env = " ".join(f"{k}={v}" for k, v in MMAP_THRESHOLD_ENV.items())
            rows += [[f"  what-if: ours with {env}", f"{_mb(w['after_rss'])} after unload", "",
                      f"{fmt(w['after_fraction'], ' %', 100, 2, True)} of weights; growth {w['growth'] / MB:+.1f} MB; "
                      f"unload {fmt(w['unload_seconds'], ' s', digits=3)}"]]
        if device.startswith("cuda"):
            rows += [["  allocator after unload − baseline", _mb(o["after_allocated"]), _mb(g["after_allocated"]),
                      "memory_allocated"],
                     ["  cache reserved − baseline", _mb(o["after_reserved"]), _mb(g["after_reserved"]),
                      "memory_reserved"]]
    if "warm_ratio" in ours:
        rows.append(["warm-offload reload ÷ pinned copy", fmt(ours["warm_ratio"], "x", digits=2), "",
                     f"copy {fmt(ours['copy_seconds'], ' s', digits=3)}"])
    else:
        rows.append(["warm-offload reload ÷ pinned copy", "n/a on cpu", "", "the weights never leave host memory"])
    return [{"title": f"swap: {weights / MB:,.0f} MB model on {device}, median (min…max) over repeats",
             "header": ["figure", "ours", "original: del + empty_cache", "floor / note"], "rows": rows}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="model size (GiB of weights)")
    parser.add_argument("--cycles", type=int, default=50, help="load/generate/unload cycles, file-mapped weights")
    parser.add_argument("--original-cycles", type=int, default=20,
                        help="cycles with the original way of unloading, file-mapped weights")
    parser.add_argument("--copied-cycles", type=int, default=8,
                        help="cycles with heap-copied weights (each load casts 1 GB: slow on cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="cold loads (and warm reloads)")
    parser.add_argument("--device", default=None, help="default: cuda:0 when available, else cpu")
    parser.add_argument("--child", choices=["ours", "original"], help=argparse.SUPPRESS)
    parser.add_argument("--scenario", choices=["mapped", "copied"], default="mapped", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if args.child:
        args.method, args.device = args.child, device
        Path(args.child_out).write_text(json.dumps(child(args), default=str))
        return

    # Compute in the device's native dtype: fp16 on a GPU; fp32 on cpu, where
    # fp16 matmuls are emulated and a forward pass would time the emulation.
    dtype_name = "float16" if device.startswith("cuda") else "float32"
    mark("swap")
    model = model_ensure(gib=args.gib, dtype_name=dtype_name)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    plan = [("mapped", "ours", args.cycles, args.repeats, None),
            ("mapped", "original", args.original_cycles, 0, None)]
    if args.copied_cycles:
        plan += [("copied", "ours", args.copied_cycles, 0, None), ("copied", "original", args.copied_cycles, 0, None)]
        if device == "cpu":
            plan.append(("copied", "ours", args.copied_cycles, 0, MMAP_THRESHOLD_ENV))
    runs, raw = {}, {}
    for scenario, method, cycles, repeats, extra_env in plan:
        key = method + ("+mmap_threshold" if extra_env else "")
        raw[f"{scenario}/{key}"] = run = run_child(method=method, scenario=scenario, model=model, device=device,
                                                   cycles=cycles, repeats=repeats, extra_env=extra_env)
        runs[scenario, key] = summarize(run)
    notes = [
        "cold: the page cache is dropped before the floor and before each load (needs root)",
        "every figure of 'original' comes from its own fresh process, after the same warm-up and baseline",
    ]
    results_write("swap", tables=tables_make(runs, device=device, weights=weights),
                  figures={"device": device, "weights_bytes": weights, "dtype": dtype_name,
                           "summary": {f"{s}/{m}": f for (s, m), f in runs.items()}, "raw": raw},
                  notes=notes)


if __name__ == "__main__":
    main()
