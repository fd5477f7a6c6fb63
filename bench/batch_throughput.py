"""Throughput of an external batch and its GPU switches, on a private stack:
its own Redis, the fake Ollama and OpenAI servers (no token delay), a fresh
SQLite database, and the GPU and CPU workers exactly as `make run` starts
them. The batch mixes local_demo, ollama_qwen:7b and openai_gpt-4o-mini at
random (seeded) and goes through the batch services that POST /v1/batches
uses.

    .venv/bin/python bench/batch_throughput.py [--lines 2000] [--max-new-tokens 8] [--compare]

Prints lines per second from submission to the output file, and the GPU
switch events (owner changes, local and Ollama unloads) next to the fewest
possible. --compare also runs the same file in arrival order (every line
queued as it comes in the file), the floor that grouping by owner beats.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

MODELS = ("local_demo", "ollama_qwen:7b", "openai_gpt-4o-mini")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=8, help="local_demo's reply length")
    parser.add_argument("--compare", action="store_true", help="also run the file in arrival order")
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, picked at random per line")
    parser.add_argument("--keep", action="store_true", help="keep the private var/ directory (logs, database)")
    args = parser.parse_args()

    from tests.stack import Stack

    stack = Stack()
    stack.start()  # sets REDIS_URL, CHAT_VAR_DIR, the fakes' URLs: before Django reads its settings
    stack.ollama.token_delay = stack.openai.token_delay = 0.0
    workers = None
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        from tests.support.workers import Workers

        workers = Workers(stack.var, f"sqlite:///{stack.var / 'db.sqlite3'}")
        for name in ("gpu", "cpu"):
            workers.start(name)
        run(args)
    finally:
        if workers is not None:
            for name in list(workers.procs):
                workers.stop(name)
        if args.keep:
            print(f"kept {stack.var}")
            stack.var = Path("/nonexistent-kept")  # stop() removes stack.var
        stack.stop()


def run(args) -> None:
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from chat import batches
    from chat.catalog import catalog_forget, model_resolve
    from chat.management.commands.demo_model import demo_model_ensure
    from chat.models import Batch, BatchStatus, ModelConfig
    from gpu_manager.state import GpuStateStore

    config = demo_model_ensure()
    ModelConfig.objects.filter(pk=config.pk).update(max_new_tokens=args.max_new_tokens)
    catalog_forget()
    user = get_user_model().objects.create_user("bench")
    rng = random.Random(args.seed)
    models = args.models.split(",")
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": rng.choice(models), "messages": [{"role": "user", "content": f"question {i}"}]}}
             for i in range(args.lines)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = batches.file_create(user=user, filename="bench.jsonl", data=data, purpose="batch")
    store = GpuStateStore(slot=settings.GPU_SLOT)
    owners = {model_resolve(m).needs_gpu_owner for m in models} - {None}
    alternations = sum(1 for a, b in zip(lines, lines[1:]) if a["body"]["model"] != b["body"]["model"])
    mix = ", ".join(f"{m}: {sum(line['body']['model'] == m for line in lines)}" for m in models)
    print(f"{args.lines} lines ({mix}),"
          f" {alternations} model changes in file order; local_demo max_new_tokens={args.max_new_tokens}; "
          f"window {settings.BATCH_MAX_IN_FLIGHT} lines")
    for order in ([Batch.Order.ARRIVAL] if args.compare else []) + [Batch.Order.GROUPED]:
        fewest = len(owners) - (store.read().owner in owners)
        since = time.time()
        started = time.monotonic()
        batch = batches.batch_create(user=user, input_file_id=upload.pk, endpoint="/v1/chat/completions", order=order)
        # Redis keeps the last GPU_EVENTS_KEPT events: collect them as they come.
        events = {}
        while True:
            events.update({(e["at"], e["kind"]): e for e in store.events(settings.GPU_EVENTS_KEPT) if e["at"] >= since})
            batch = Batch.objects.get(pk=batch.pk)
            if batch.status in (BatchStatus.COMPLETED, BatchStatus.FAILED):
                break
            time.sleep(0.2)
        seconds = time.monotonic() - started
        counts = batches.batch_counts(batch)
        kinds = {k: sum(e["kind"] == k for e in events.values())
                 for k in ("owner_change", "local_unload", "ollama_unload", "local_load")}
        print(f"{order:8}: {batch.status}, {counts['completed']} completed, {counts['failed']} failed in "
              f"{seconds:.1f} s = {args.lines / seconds:.1f} lines/s; switches {kinds} "
              f"(fewest owner changes possible: {fewest})")
        if batch.error_file_id:
            codes = Counter(_error_code(json.loads(line)) for line in batch.error_file.content.splitlines())
            print(f"          failed lines by error: {dict(codes)}")


def _error_code(result: dict) -> str:
    if result["error"]:
        return result["error"]["code"]
    return result["response"]["body"]["error"]["code"]


if __name__ == "__main__":
    main()
