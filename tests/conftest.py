"""Shared fixtures: real Celery workers as subprocesses, the demo model, a
logged-in websocket, and condition waits (never bare sleeps)."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_asyncio
from channels.testing import WebsocketCommunicator
from django.db import connection

from chatsite.celery import app

ROOT = Path(__file__).resolve().parent.parent
WORKER_READY_TIMEOUT = 90.0


def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Workers:
    """The GPU worker and a CPU worker, started exactly as `make run` starts
    them (chat/management/commands/runstack.py), against the test database."""

    def __init__(self, var: Path, database_url: str):
        self.var = var
        self.database_url = database_url
        self.procs: dict[str, subprocess.Popen] = {}

    def argv(self, name: str) -> list[str]:
        """`gpu` and `cpu` as `make run` starts them; `gpu1` is a second GPU
        worker (slot 1), as docker-compose.yml starts one per extra GPU."""
        from chat.management.commands.runstack import stack_commands

        kind = "gpu" if name.startswith("gpu") else "cpu"
        for proc_name, argv in stack_commands(host="127.0.0.1", port=0):
            if proc_name == f"{kind}-worker":
                argv = [a.replace("@%h", "@test").replace("gpu@", f"{name}@") for a in argv]
                return [f"gpu.{self.slot(name)}" if a.startswith("gpu.") else a for a in argv]
        raise KeyError(name)

    @staticmethod
    def slot(name: str) -> str:
        return name.removeprefix("gpu") or "0"

    def start(self, name: str) -> None:
        env = {**os.environ, "DATABASE_URL": self.database_url, "PYTHONUNBUFFERED": "1"}
        if name.startswith("gpu"):
            env["GPU_SLOT"] = self.slot(name)
        log = open(self.var / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(self.argv(name), cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)
        node = f"{name}@test"

        def answered() -> bool:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} worker exited:\n{self.log(name)}")
            return any(node in reply for reply in app.control.ping(destination=[node], timeout=0.5))

        wait_for(answered, timeout=WORKER_READY_TIMEOUT, interval=0.2, what=f"{name} worker")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @contextlib.contextmanager
    def restarted_with(self, names: tuple[str, ...], **env: str):
        """Restart `names` with `env` set for the block, and as before after it."""
        before = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        self._restart(names)
        try:
            yield
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
            self._restart(names)

    def _restart(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.stop(name)
            self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL: the worker gets no chance to clean up, as in a crash."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def log(self, name: str) -> str:
        path = self.var / f"{name}.log"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""


def test_database_url(db: dict) -> str:
    """The URL of the test database pytest-django created, for the workers."""
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    scheme = {"postgresql": "postgres", "mysql": "mysql"}[db["ENGINE"].rsplit(".", 1)[-1]]
    auth = f"{quote(db['USER'])}:{quote(db['PASSWORD'])}@" if db.get("USER") else ""
    return f"{scheme}://{auth}{db.get('HOST') or 'localhost'}:{db.get('PORT') or ''}/{db['NAME']}"


@pytest.fixture(scope="session")
def workers(stack, django_db_setup, django_db_blocker):
    running = Workers(stack.var, test_database_url(connection.settings_dict))
    try:
        for name in ("gpu", "cpu"):
            running.start(name)
        yield running
    finally:
        for name in list(running.procs):
            running.stop(name)


@pytest.fixture(autouse=True)
def fakes_reset(stack):
    """Each test starts with well-behaved outside servers and empty logs."""
    for fake, defaults in ((stack.ollama, OLLAMA_DEFAULTS), (stack.openai, OPENAI_DEFAULTS)):
        for attr, value in defaults.items():
            setattr(fake, attr, value)
        if fake.url is None:
            fake.start()
        fake.clear()
    yield


OLLAMA_DEFAULTS = {"models": ("qwen:7b",), "reply": "Hello from fake Ollama.", "token_delay": 0.0,
                   "unload_delay": 0.0, "fail": None}
OPENAI_DEFAULTS = {"models": ("gpt-4o-mini",), "reply": "Hello from fake OpenAI.", "token_delay": 0.0,
                   "fail_status": None, "slow_seconds": None}


@pytest.fixture
def demo_model(transactional_db):
    from chat.catalog import catalog_forget
    from chat.management.commands.demo_model import demo_model_ensure

    config = demo_model_ensure()
    catalog_forget()
    return config


@pytest.fixture
def user(transactional_db, django_user_model):
    return django_user_model.objects.create_user(username="alice", password="pw-alice-123")


def session_cookie(user) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@pytest.fixture
def ws_headers(user) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", f"sessionid={session_cookie(user)}".encode()), (b"origin", b"http://localhost")]


# Every socket an async test opens, so that its teardown closes what the test left open.
_SOCKETS: list[WebsocketCommunicator] = []


def communicator(headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    from chatsite.asgi import application

    comm = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    _SOCKETS.append(comm)
    return comm


@pytest.fixture(autouse=True)
def sockets_closed(request):
    """Every socket an async test leaves open is disconnected, as a server
    would, on the test's own event loop before that loop closes. A consumer
    still running when its loop closes is destroyed with channels_redis's
    `receive()` pending and its `finally` never run: the process-wide layer
    goes on counting a receiver on a dead loop and refuses every later
    consumer ("Two event loops are trying to receive() on one channel layer
    at once!"), so each websocket test after it fails (a CI failure). A
    consumer that outlives its disconnect is an error of its own test."""
    if inspect.iscoroutinefunction(request.function):
        request.getfixturevalue("sockets_disconnected")


@pytest_asyncio.fixture
async def sockets_disconnected():
    from channels.layers import get_channel_layer

    _SOCKETS.clear()
    yield
    while _SOCKETS:
        comm = _SOCKETS.pop()
        if not comm.future.done():
            # What the application raises as it ends is its test's business.
            with contextlib.suppress(Exception):
                await comm.disconnect(timeout=5)
    layer = get_channel_layer()
    if layer.receive_count:
        layer.receive_count, layer.receive_lock, layer.receive_event_loop = 0, None, None
        raise AssertionError("a consumer went on receiving after its socket was disconnected")


async def frames_until(comm: WebsocketCommunicator, done, *, timeout: float = 60.0) -> list[dict]:
    """Receive frames until `done(frame)` is true for one; return them all."""
    frames = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise AssertionError(f"no final frame within {timeout} s; got {frames}")
        frame = json.loads(await comm.receive_from(timeout=remaining))
        frames.append(frame)
        if done(frame):
            return frames


def ends(message_id: int):
    return lambda f: f.get("type") in ("chat.done", "chat.error") and f.get("message") == message_id


async def send_and_finish(comm, *, model: str, content: str, conversation=None, timeout: float = 60.0):
    """Send one chat message; return (accepted frame, every later frame up to its end)."""
    await comm.send_json_to({"type": "chat.send", "model": model, "content": content,
                             "conversation": conversation, "client_id": f"c-{time.monotonic_ns()}"})
    accepted = (await frames_until(comm, lambda f: f["type"] in ("chat.accepted", "chat.error"), timeout=timeout))[-1]
    assert accepted["type"] == "chat.accepted", accepted
    frames = await frames_until(comm, ends(accepted["message"]), timeout=timeout)
    return accepted, frames

