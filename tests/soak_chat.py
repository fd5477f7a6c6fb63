"""Load (issue 7): 100 chat sockets for 60 s against the real stack, a mix
of local, Ollama and OpenAI messages, and not one message lost.

Not collected by `make test` (the name does not match test_*.py); run it
with `make soak`. SOAK_SOCKETS, SOAK_SECONDS and SOAK_USERS change the
shape. The stack is the suite's (tests/stack.py): a private Redis, the fake
Ollama and OpenAI servers, the GPU and CPU workers as `make run` starts
them, and uvicorn as a subprocess; the clients are `websockets` sockets, as
a browser's, each a user who sends, reads the reply to its end, thinks for
a moment and sends again. The figures go to stdout and to var/soak.json;
docs/reliability.md records them.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from django.conf import settings
from django.db import connection

from chat.catalog import catalog_forget
from chat.models import FINISHED_STATUSES, Message, ModelConfig
from gpu_manager.state import GpuStateStore
from tests.support import ROOT
from tests.support.sockets import receive, session_cookie
from tests.support.users import user_create
from tests.support.web import WebServer
from tests.support.workers import test_database_url

SOCKETS = int(os.environ.get("SOAK_SOCKETS", 100))
SECONDS = float(os.environ.get("SOAK_SECONDS", 60))
USERS = int(os.environ.get("SOAK_USERS", 10))
#: What the sockets ask for: local_demo on the GPU worker, Ollama (which
#: takes the GPU from it), and a remote OpenAI endpoint that does not use it.
MIX = {"local_demo": 0.4, "ollama_qwen:7b": 0.3, "openai_gpt-4o-mini": 0.3}
#: A user reads the reply and types the next message: seconds between a
#: reply's end and the next send (idling is the behaviour under load test).
THINK = (0.5, 2.0)
#: After the run, how long the messages still in flight may take to end.
DRAIN_TIMEOUT = 300.0
REPLY = "A short answer of about a dozen tokens, streamed one by one."


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))] if ordered else 0.0


@dataclass
class Sent:
    model: str
    sent: float
    message: int | None = None
    first: float | None = None
    end: float | None = None
    end_type: str = ""
    code: str = ""
    seqs: list[int] = field(default_factory=list)


@dataclass
class Tally:
    sent: list[Sent] = field(default_factory=list)
    ends_by_message: Counter = field(default_factory=Counter)
    refused: list[dict] = field(default_factory=list)  # a chat.error instead of chat.accepted


async def client(web: WebServer, session: str, deadline: float, tally: Tally, rng: random.Random) -> None:
    async with web.socket(session) as ws:
        while time.monotonic() < deadline:
            model = rng.choices(list(MIX), weights=list(MIX.values()))[0]
            item = Sent(model=model, sent=time.monotonic())
            tally.sent.append(item)
            await ws.send(json.dumps({"type": "chat.send", "model": model, "content": f"soak {len(tally.sent)}",
                                      "client_id": str(len(tally.sent))}))
            while item.end is None:
                frame = await receive(ws, timeout=DRAIN_TIMEOUT)
                kind, message = frame["type"], frame.get("message")
                if kind in ("chat.done", "chat.error") and message is not None:
                    tally.ends_by_message[message] += 1
                if kind == "chat.accepted":
                    item.message = frame["message"]
                elif kind == "chat.error" and message is None:
                    tally.refused.append(frame)
                    item.end, item.end_type, item.code = time.monotonic(), "refused", frame["code"]
                elif message != item.message:
                    continue  # a frame of an earlier reply: counted above
                elif kind == "chat.delta":
                    item.first = item.first or time.monotonic()
                    item.seqs.append(frame["seq"])
                elif kind in ("chat.done", "chat.error"):
                    item.end, item.end_type, item.code = time.monotonic(), kind, frame.get("code", "")
            await asyncio.sleep(rng.uniform(*THINK))


def summary(tally: Tally, seconds: float, switches: Counter, unfinished: int, statuses: Counter) -> dict:
    accepted = [s for s in tally.sent if s.message is not None]
    done = [s for s in accepted if s.end_type == "chat.done"]
    latency = [s.end - s.sent for s in done]
    ttft = [s.first - s.sent for s in done if s.first]
    per_model = {}
    for model in MIX:
        mine = [s.end - s.sent for s in done if s.model == model]
        first = [s.first - s.sent for s in done if s.model == model and s.first]
        per_model[model] = {"done": len(mine), "p50": percentile(mine, 50), "p99": percentile(mine, 99),
                            "ttft_p50": percentile(first, 50), "ttft_p99": percentile(first, 99)}
    return {
        "sockets": SOCKETS, "users": USERS, "seconds": seconds, "mix": MIX, "think_seconds": THINK,
        "sent": len(tally.sent), "accepted": len(accepted), "refused": len(tally.refused),
        "done": len(done), "errors": Counter(s.code for s in accepted if s.end_type == "chat.error"),
        "lost": sum(1 for s in accepted if s.end is None),
        "ended_twice": sum(1 for n in tally.ends_by_message.values() if n > 1),
        "seq_gaps": sum(1 for s in done if s.seqs != list(range(len(s.seqs)))),
        "unfinished_in_database": unfinished, "database_statuses": dict(statuses),
        "throughput_per_s": len(done) / seconds,
        "latency_s": {"p50": percentile(latency, 50), "p90": percentile(latency, 90),
                      "p99": percentile(latency, 99), "max": max(latency, default=0.0)},
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "per_model": per_model, "gpu_switches": dict(switches),
    }


def print_table(result: dict) -> None:
    print(f"\nsoak: {result['sockets']} sockets ({result['users']} users), {result['seconds']:.0f} s, "
          f"sent {result['sent']}, accepted {result['accepted']}, done {result['done']}, "
          f"errors {dict(result['errors'])}, refused {result['refused']}, lost {result['lost']}, "
          f"ended twice {result['ended_twice']}, unfinished in the database {result['unfinished_in_database']}")
    print(f"throughput {result['throughput_per_s']:.1f} replies/s; GPU switches {result['gpu_switches']}")
    print("| model | replies | p50 s | p99 s | first token p50 s | first token p99 s |")
    print("|---|---|---|---|---|---|")
    for model, row in result["per_model"].items():
        print(f"| {model} | {row['done']} | {row['p50']:.2f} | {row['p99']:.2f} | {row['ttft_p50']:.2f} | "
              f"{row['ttft_p99']:.2f} |")
    lat, ttft = result["latency_s"], result["ttft_s"]
    print(f"| all | {result['done']} | {lat['p50']:.2f} | {lat['p99']:.2f} | {ttft['p50']:.2f} | "
          f"{ttft['p99']:.2f} |  (p90 {lat['p90']:.2f} s, max {lat['max']:.2f} s)")


@pytest.mark.timeout(SECONDS + DRAIN_TIMEOUT + 300)
@pytest.mark.django_db(transaction=True)
def test_soak(django_user_model, demo_model, workers, stack):
    ModelConfig.objects.filter(pk=demo_model.pk).update(max_new_tokens=16)
    ModelConfig.objects.create(kind="openai", name="remote-api", base_url=stack.openai.url + "/v1",
                               api_key=stack.openai.api_key, frees_gpu=False)
    catalog_forget()
    for fake in (stack.ollama, stack.openai):
        fake.reply, fake.token_delay = REPLY, 0.005
    sessions = [session_cookie(user_create(f"soak{i}", "pw-soak-123"))
                for i in range(USERS)]
    web = WebServer(log_dir=stack.var, database_url=test_database_url(connection.settings_dict))
    web.start()
    store = GpuStateStore(slot=settings.GPU_SLOT)
    events_before = len(store.events(settings.GPU_EVENTS_KEPT))
    tally = Tally()
    try:
        started = time.monotonic()

        async def run() -> None:
            deadline = time.monotonic() + SECONDS
            rng = random.Random(7)
            await asyncio.gather(*(client(web, sessions[i % USERS], deadline, tally, random.Random(rng.random()))
                                   for i in range(SOCKETS)))

        asyncio.run(run())
        seconds = time.monotonic() - started
    finally:
        web.stop()
    events = store.events(settings.GPU_EVENTS_KEPT)[events_before:]
    switches = Counter(e["kind"] for e in events)
    replies = Message.objects.filter(role="assistant")
    unfinished = replies.exclude(status__in=FINISHED_STATUSES).count()
    statuses = Counter(replies.values_list("status", flat=True))
    result = summary(tally, seconds, switches, unfinished, statuses)
    (ROOT / "var").mkdir(exist_ok=True)
    (ROOT / "var" / "soak.json").write_text(json.dumps(result, indent=2, default=str))
    print_table(result)
    assert result["accepted"] == result["sent"] - result["refused"]
    assert result["lost"] == 0 and result["ended_twice"] == 0 and result["seq_gaps"] == 0, result
    assert unfinished == 0 and statuses.get("done", 0) == result["done"], result
    assert not result["errors"] and not result["refused"], result
