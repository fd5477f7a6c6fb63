"""Fixtures only: real Celery workers as subprocesses, the web process for
the OpenAI-compatible API, the demo model, a logged-in websocket, and the
teardown of sockets a test left open. Helpers are in tests/support/; the
private Redis and the fake outside servers come from the plugin
tests/stack.py.

Tests that need the subprocess stack (the workers, a web process, a
browser) are marked `stack` here, from the fixtures they use directly or
through other fixtures; `make test-fast` runs the rest (`-m "not stack"`)."""
from __future__ import annotations

import inspect

import openai
import pytest
import pytest_asyncio
from django.db import connection

from tests.support.sockets import session_cookie, sockets_disconnect, sockets_forget
from tests.support.users import user_create
from tests.support.web import WebServer
from tests.support.workers import Workers, test_database_url

#: Fixtures that start (or need) worker or web subprocesses or a browser: a
#: test that uses one of them, directly or through another fixture, is
#: marked `stack`. `server` and `browser` are the browser tests' own.
STACK_FIXTURES = frozenset({"workers", "api_server", "server", "browser"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def workers(stack, django_db_setup, django_db_blocker):
    running = Workers(stack.var, test_database_url(connection.settings_dict))
    try:
        for name in ("gpu", "cpu", "knowledge"):
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


@pytest.fixture(autouse=True)
def cancel_flags_cleared(stack):
    """No test inherits another's cancel flags. The database is emptied
    between tests and its ids start again (SQLite always, PostgreSQL's
    sequences on flush), while Redis is the session's: a flag left by an
    earlier test's reply (one killed with its worker never ends to clear
    it) would stop this test's reply of the same id."""
    from chat.dispatch import CANCEL_PREFIX
    from chatsite.redis_client import redis_client

    client = redis_client()
    stale = list(client.scan_iter(match=f"{CANCEL_PREFIX}:*", count=1000))
    if stale:
        client.delete(*stale)
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
def demo_engines(transactional_db):
    """The demo embedder and translator (issue 15), as `make run` configures them."""
    from chat.catalog import catalog_forget
    from chat.management.commands.demo_model import demo_engines_ensure

    configs = demo_engines_ensure()
    catalog_forget()
    return configs


@pytest.fixture
def user(transactional_db):
    return user_create("alice", "pw-alice-123")


@pytest.fixture
def ws_headers(user) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", f"sessionid={session_cookie(user)}".encode()), (b"origin", b"http://localhost")]


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
    sockets_forget()
    yield
    await sockets_disconnect()


# --- the OpenAI-compatible API -------------------------------------------------

@pytest.fixture(scope="module")
def api_server(stack, django_db_setup, django_db_blocker):
    """The web process for one test module (starting one takes about a
    second); its URL."""
    web = WebServer(log_dir=stack.var, database_url=test_database_url(connection.settings_dict))
    web.start()
    try:
        yield web.url
    finally:
        web.stop()


@pytest.fixture
def api_key(user) -> str:
    from chat.api.keys import api_key_create

    return api_key_create(user=user, name="tests")[1]


@pytest.fixture
def api(api_server, api_key) -> openai.OpenAI:
    """The official client, as a user would build it; no retries, so that an
    error status is seen as it is."""
    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=api_key, max_retries=0, timeout=60)
