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

Also printed: the lines in flight (a reply queued or running), sampled
every 0.2 s, against the window (settings.BATCH_MAX_IN_FLIGHT, from the
environment): a mean well under the window says the batch's own
dispatching, not the window, set the pace.

--probe MODEL[,MODEL] sends an interactive message (as the chat page does:
no priority) to each model every --probe-every seconds while the batch
runs, and three of each before it: their time from queued to finished,
idle and during the batch, is what a batch's window costs the people
chatting (the CPU worker's share for an external model; for local_demo,
the wait for the GPU, which Ollama's leases of the lines in flight hold).
--cpu-workers N starts N CPU worker processes instead of `make run`'s
(settings.CPU_WORKER_PROCESSES).
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
    parser.add_argument("--probe", default="", help="comma-separated models to send interactive messages to")
    parser.add_argument("--probe-every", type=float, default=2.0, help="seconds between two rounds of probes")
    parser.add_argument("--cpu-workers", type=int, default=None,
                        help="CPU worker processes (default: make run's, settings.CPU_WORKER_PROCESSES)")
    args = parser.parse_args()

    from tests.stack import Stack

    stack = Stack()
    stack.start()  # sets REDIS_URL, CHAT_VAR_DIR, the fakes' URLs: before Django reads its settings
    stack.ollama.token_delay = stack.openai.token_delay = 0.0
    for fake in (stack.ollama, stack.openai):
        # The fakes listen with socketserver's backlog of 5: a window's worth
        # of connections opened at once overflows it, and a dropped SYN is
        # retried after 1 s, past the stack's 0.5 s connect timeout (the
        # line fails with endpoint_unavailable). Ollama and OpenAI's servers
        # queue thousands; on Linux a second listen() resizes the backlog.
        fake._httpd.socket.listen(1024)
    workers = None
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        from tests.support.workers import Workers

        class _Workers(Workers):
            """`cpu2`, `cpu3`…: more CPU workers, named apart, as `make run` names them."""

            def argv(self, name: str) -> list[str]:
                argv = super().argv(name)
                return [a.replace("cpu@test", f"{name}@test") for a in argv] if name.startswith("cpu") else argv

        workers = _Workers(stack.var, f"sqlite:///{stack.var / 'db.sqlite3'}")
        from django.conf import settings

        cpu_workers = args.cpu_workers or settings.CPU_WORKER_PROCESSES
        for name in ("gpu", "cpu", *(f"cpu{n}" for n in range(2, cpu_workers + 1))):
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
    from chat.models import FINISHED_STATUSES, Batch, BatchLine, BatchStatus, ModelConfig
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
    probes = Probes(user, [m for m in args.probe.split(",") if m])
    probes.idle()
    for order in ([Batch.Order.ARRIVAL] if args.compare else []) + [Batch.Order.GROUPED]:
        fewest = len(owners) - (store.read().owner in owners)
        since = time.time()
        started = time.monotonic()
        batch = batches.batch_create(user=user, input_file_id=upload.pk, endpoint="/v1/chat/completions", order=order)
        # Redis keeps the last GPU_EVENTS_KEPT events: collect them as they come.
        events, in_flight = {}, []
        next_probe = started + args.probe_every / 2
        while True:
            events.update({(e["at"], e["kind"]): e for e in store.events(settings.GPU_EVENTS_KEPT) if e["at"] >= since})
            batch = Batch.objects.get(pk=batch.pk)
            if batch.status in (BatchStatus.COMPLETED, BatchStatus.FAILED):
                break
            if batch.status == BatchStatus.IN_PROGRESS:
                in_flight.append(BatchLine.objects.filter(batch=batch, state=BatchLine.State.DISPATCHED)
                                 .exclude(message__status__in=FINISHED_STATUSES).count())
                if probes.models and time.monotonic() >= next_probe:
                    probes.send("batch")
                    next_probe = time.monotonic() + args.probe_every
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
        if in_flight:
            print(f"          lines in flight: mean {sum(in_flight) / len(in_flight):.1f}, most {max(in_flight)} "
                  f"(window {settings.BATCH_MAX_IN_FLIGHT}; {len(in_flight)} samples)")
    probes.report()


class Probes:
    """Interactive messages beside the batch: queued as the chat page
    queues them (`message_enqueue`, no priority), timed from the reply's
    queued_at to its finished_at (both written by the stack)."""

    def __init__(self, user, models: list[str]):
        self.user, self.models = user, models
        self.sent: list[tuple[str, str, int]] = []  # (phase, model, reply id)

    def send(self, phase: str) -> None:
        from chat.services import message_enqueue

        for model in self.models:
            reply = message_enqueue(user=self.user, model=model, content=f"probe {len(self.sent)}",
                                    conversation_id=None)
            self.sent.append((phase, model, reply.pk))

    def idle(self) -> None:
        """Three rounds before the batch, one at a time: the latency without it."""
        for _ in range(3 if self.models else 0):
            self.send("idle")
            self._wait([pk for _, _, pk in self.sent[-len(self.models):]])

    def _wait(self, ids: list[int], timeout: float = 120.0) -> None:
        from chat.models import FINISHED_STATUSES, Message

        deadline = time.monotonic() + timeout
        while Message.objects.filter(pk__in=ids).exclude(status__in=FINISHED_STATUSES).exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def report(self) -> None:
        from chat.models import Message

        if not self.sent:
            return
        self._wait([pk for _, _, pk in self.sent])
        replies = {m.pk: m for m in Message.objects.filter(pk__in=[pk for _, _, pk in self.sent])}
        for model in self.models:
            for phase in ("idle", "batch"):
                seconds = sorted((replies[pk].finished_at - replies[pk].queued_at).total_seconds()
                                 for p, m, pk in self.sent if p == phase and m == model and replies[pk].finished_at)
                statuses = Counter(replies[pk].status for p, m, pk in self.sent if p == phase and m == model)
                if seconds:
                    print(f"probe {model:20} {phase:5}: {len(seconds)} replies, median "
                          f"{1000 * seconds[len(seconds) // 2]:.0f} ms, max {1000 * seconds[-1]:.0f} ms "
                          f"({dict(statuses)})")


def _error_code(result: dict) -> str:
    if result["error"]:
        return result["error"]["code"]
    return result["response"]["body"]["error"]["code"]


if __name__ == "__main__":
    main()
