"""A pytest plugin that brings up what the suite talks to over real
connections, before Django reads its settings (which take the URLs from the
environment): a private Redis on a free port, a fake Ollama and a fake
OpenAI-compatible server on loopback, and a private var/ directory (test
database, demo model) so that two checkouts never share state.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from chatsite.redis_server import PrivateRedis
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI


class Stack:
    def __init__(self) -> None:
        self.var = Path(tempfile.mkdtemp(prefix="chat-test-"))
        self.redis = PrivateRedis(directory=self.var / "redis")
        self.ollama = FakeOllama()
        self.openai = FakeOpenAI()

    def start(self) -> None:
        os.environ["REDIS_URL"] = self.redis.start()
        self.ollama.start()
        self.openai.start()
        os.environ.update({
            "CHAT_VAR_DIR": str(self.var),
            "OLLAMA_BASE_URL": self.ollama.url,
            "OPENAI_BASE_URL": self.openai.url + "/v1",
            "OPENAI_API_KEY": self.openai.api_key,
            # A down endpoint must be noticed at once in tests, not after 2 s.
            "UPSTREAM_CONNECT_TIMEOUT": "0.5",
            "OLLAMA_UNLOAD_TIMEOUT": "5",
            # Short leases, so the crash tests wait seconds, not the default 15.
            "GPU_LEASE_TTL": "3",
            "GPU_HOUSEKEEPING_SECONDS": "0.5",
            # A reply whose task an emptied Redis lost is queued again after
            # seconds, not the default minute (tests/test_faults.py).
            "REPLY_REDISPATCH_AFTER_SECONDS": "5",
            # The suite sends hundreds of messages as one user within a
            # minute; tests/test_security.py turns the rate limit on.
            "CHAT_RATE_LIMIT_MESSAGES": "0",
        })

    def stop(self) -> None:
        self.ollama.stop()
        self.openai.stop()
        self.redis.stop()
        shutil.rmtree(self.var, ignore_errors=True)


_stack: Stack | None = None


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config, parser, args):
    # A wrapper runs before every plain implementation, pytest-django's
    # included, which sets Django up (and so reads the settings) in this hook.
    global _stack
    _stack = Stack()
    _stack.start()
    return (yield)


def pytest_unconfigure(config):
    if _stack is not None:
        _stack.stop()


@pytest.fixture(scope="session")
def stack() -> Stack:
    assert _stack is not None
    return _stack
