"""Self-check of loading and unloading on this machine's device.

    python -m gpu_manager.selfcheck --gib N --out FILE.json [--cycles 20] [--device cuda:0]

Builds a Llama model of about N GiB (random weights, the demo tokenizer),
then on the current device measures, each against its floor in the same run:

- cold load (from_pretrained, plus a first forward pass: on cpu a memory-
  mapped load can return before any byte is read) / reading the same
  safetensors bytes onto the device (on cpu: and touching every byte);
- unload time, and memory after unload minus the baseline before loading
  (the allocator on cuda; anonymous and file-backed RSS on cpu);
- warm-offload reload / a plain host-to-device copy of the same bytes
  (on cpu the weights never leave host memory: both are ~0 and not compared);
- growth of memory after unload over `--cycles` load/unload cycles.

It prints a table and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from gpu_manager.demo_model import demo_model_create
from gpu_manager.engines import LocalEngine
from gpu_manager.memory import memory_release, memory_snapshot

GIB = 1 << 30
PAGE = 4096


def model_build(path: Path, *, nbytes: int, dtype: torch.dtype = torch.float16) -> Path:
    """A Llama of about `nbytes` of weights at `path`, written with
    save_pretrained like any real model directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    tokenizer_dir = demo_model_create(path=path.parent / "tokenizer-source")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hidden = 2048 if nbytes >= GIB // 4 else 512
    intermediate = hidden * 11 // 4
    element = torch.finfo(dtype).bits // 8
    per_layer = (4 * hidden * hidden + 3 * hidden * intermediate) * element
    layers = max(1, math.ceil(nbytes / per_layer))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=2048,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    # Skipping the default init and drawing small normals is ~10x faster
    # than transformers' initialisation for a multi-GiB model.
    with no_init_weights():
        model = LlamaForCausalLM(config).to(dtype)
    for tensor in model.parameters():
        tensor.data.normal_(0, 0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def drop_page_cache() -> bool:
    """Evict file pages, so that "cold" means read from the disk for both
    the load and its floor. Needs root; without it both read from the page
    cache, and the JSON says so."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def floor_read(path: Path, device: str) -> float:
    """Seconds to read the model's safetensors bytes onto the device."""
    from safetensors.torch import load_file

    started = time.perf_counter()
    total = 0.0
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file, device=device)
        if device == "cpu":  # mmap: make every page really come in, one byte each
            total += sum(int(t.reshape(-1).view(torch.uint8)[::PAGE].sum()) for t in tensors.values())
        del tensors
    _sync(device)
    return time.perf_counter() - started


def floor_copy(engine: LocalEngine, device: str) -> float:
    """Seconds for a plain host-to-device copy of the engine's weights from
    pinned host memory: what a warm reload cannot beat."""
    host = [t.detach().to("cpu").pin_memory() for t in engine.model.parameters()]
    _sync(device)
    started = time.perf_counter()
    copies = [t.to(device, non_blocking=True) for t in host]
    _sync(device)
    seconds = time.perf_counter() - started
    del copies, host
    memory_release(device)
    return seconds


def _load_and_forward(engine: LocalEngine) -> float:
    started = time.perf_counter()
    engine.load()
    with torch.inference_mode():
        engine.model(torch.tensor([[1, 2, 3]], device=engine.model.device))
    _sync(engine.device)
    return time.perf_counter() - started


def _resident(reading: dict) -> int:
    return reading["allocated"]


def selfcheck(*, gib: float, device: str, cycles: int, workdir: Path) -> dict:
    path = model_build(workdir / "model", nbytes=int(gib * GIB))
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # Warm-up: the first load imports the model classes and sets up the
    # allocator; the baseline is taken after it, as any steady state is.
    warmup = LocalEngine(name="warmup", path=str(path.parent / "tokenizer-source"), device=device)
    _load_and_forward(warmup)
    warmup.unload()
    cold = drop_page_cache()
    floor = floor_read(path, device)
    memory_release(device)
    baseline = memory_snapshot(device)

    drop_page_cache()
    engine = LocalEngine(name="selfcheck", path=str(path), device=device)
    load_seconds = _load_and_forward(engine)
    loaded = memory_snapshot(device)
    started = time.perf_counter()
    survivors = engine.unload()
    unload_seconds = time.perf_counter() - started
    after_unload = memory_snapshot(device)

    warm = {"applicable": device != "cpu"}
    if warm["applicable"]:
        engine = LocalEngine(name="selfcheck", path=str(path), device=device, warm_offload=True)
        engine.load()
        warm["copy_floor_seconds"] = floor_copy(engine, device)
        engine.offload()
        started = time.perf_counter()
        engine.restore()
        warm["reload_seconds"] = time.perf_counter() - started
        warm["ratio"] = warm["reload_seconds"] / warm["copy_floor_seconds"]
        engine.unload()

    after = []
    for _ in range(cycles):
        cycle = LocalEngine(name="selfcheck", path=str(path), device=device)
        _load_and_forward(cycle)
        cycle.unload()
        after.append(_resident(memory_snapshot(device)))
    return {
        "device": device,
        "weights_bytes": weights,
        "cold_load_seconds": load_seconds,
        "floor_read_seconds": floor,
        "cold_load_ratio": load_seconds / floor,
        "page_cache_dropped": cold,
        "unload_seconds": unload_seconds,
        "survivors": survivors,
        "baseline": baseline,
        "loaded": loaded,
        "after_unload": after_unload,
        "after_minus_baseline_bytes": _resident(after_unload) - _resident(baseline),
        "after_minus_baseline_fraction_of_weights": (_resident(after_unload) - _resident(baseline)) / weights,
        "warm_offload": warm,
        "cycles": cycles,
        "growth_over_cycles_bytes": (after[-1] - after[0]) if after else 0,
    }


def table(result: dict) -> str:
    mb = 1e6
    rows = [
        ("device", result["device"]),
        ("weights", f"{result['weights_bytes'] / mb:,.0f} MB"),
        ("cold load + first forward", f"{result['cold_load_seconds']:.3f} s"),
        ("floor: read the same bytes", f"{result['floor_read_seconds']:.3f} s"
                                       f"{'' if result['page_cache_dropped'] else ' (from the page cache)'}"),
        ("cold load / floor", f"{result['cold_load_ratio']:.2f}x"),
        ("unload", f"{result['unload_seconds']:.3f} s, survivors: {result['survivors'] or 'none'}"),
        ("memory after unload - baseline", f"{result['after_minus_baseline_bytes'] / mb:+,.1f} MB "
                                            f"({result['after_minus_baseline_fraction_of_weights']:+.2%} of weights)"),
    ]
    warm = result["warm_offload"]
    if warm["applicable"]:
        rows += [("warm reload", f"{warm['reload_seconds']:.3f} s"),
                 ("floor: pinned host-to-device copy", f"{warm['copy_floor_seconds']:.3f} s"),
                 ("warm reload / copy", f"{warm['ratio']:.2f}x")]
    else:
        rows.append(("warm offload", "n/a on cpu: the weights never leave host memory"))
    rows.append((f"growth over {result['cycles']} cycles", f"{result['growth_over_cycles_bytes'] / mb:+,.1f} MB"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gpu_manager.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, required=True, help="model size in GiB")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gpu-selfcheck-"))
    try:
        result = selfcheck(gib=args.gib, device=args.device, cycles=args.cycles, workdir=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
