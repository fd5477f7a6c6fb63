"""Helpers of the OpenAI-compatible API and batch tests (the fixtures
`api_server`, `api_key` and `api` are in tests/conftest.py)."""
from __future__ import annotations

import json

import openai
from django.conf import settings

from gpu_manager.state import GpuStateStore
from tests.support.waiting import wait_for

#: GPU events that are a switch of the GPU's owner or of what it holds.
SWITCH_KINDS = ("local_unload", "ollama_unload", "owner_change")


def switches_since(since: float) -> dict[str, int]:
    """How many GPU switch events of each kind ended after `since` (time.time())."""
    events = [e for e in GpuStateStore(slot=settings.GPU_SLOT).events(settings.GPU_EVENTS_KEPT) if e["at"] >= since]
    return {kind: sum(1 for e in events if e["kind"] == kind) for kind in SWITCH_KINDS}


def wait_batch(api: openai.OpenAI, batch_id: str, *, statuses=("completed", "failed", "cancelled"),
               timeout: float = 120.0):
    """Retrieve the batch until it reaches one of `statuses`."""
    found = {}

    def reached():
        found["batch"] = api.batches.retrieve(batch_id)
        return found["batch"].status in statuses

    wait_for(reached, timeout=timeout, interval=0.2, what=f"batch {batch_id} to reach {statuses}")
    return found["batch"]


def jsonl(lines) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def request_line(custom_id: str, model: str, content: str = "hello", url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": content}]}}
