"""Fixtures and helpers for the OpenAI-compatible API tests: the web server
exactly as `make run` starts it (uvicorn, from runstack's command list)
against the test database, API keys, and the official `openai` client.

Imported by the test modules that use them (each module gets its own
server: starting one takes about a second)."""
from __future__ import annotations

import os
import socket
import subprocess

import httpx
import openai
import pytest
from django.conf import settings
from django.db import connection

from chat.api.keys import api_key_create
from gpu_manager.state import GpuStateStore
from tests.conftest import ROOT, test_database_url, wait_for

#: GPU events that are a switch of the GPU's owner or of what it holds.
SWITCH_KINDS = ("local_unload", "ollama_unload", "owner_change")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_server(stack, django_db_setup, django_db_blocker):
    from chat.management.commands.runstack import stack_commands

    port = _free_port()
    argv = dict(stack_commands(host="127.0.0.1", port=port))["web"]
    env = {**os.environ, "DATABASE_URL": test_database_url(connection.settings_dict), "PYTHONUNBUFFERED": "1"}
    log_path = stack.var / f"web-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the web server exited:\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout=60, interval=0.1, what="the web server")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def api_key(user) -> str:
    return api_key_create(user=user, name="tests")[1]


@pytest.fixture
def api(api_server, api_key) -> openai.OpenAI:
    """The official client, as a user would build it; no retries, so that an
    error status is seen as it is."""
    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=api_key, max_retries=0, timeout=60)


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
    import json

    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def request_line(custom_id: str, model: str, content: str = "hello", url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": content}]}}
