"""Waiting on conditions with timeouts, never bare sleeps.

`wait_for` is the one poll-until-true of the suite: it returns the
predicate's first truthy value and fails the test (AssertionError, naming
what it waited for) when the timeout passes. `eventually` is the same wait
from a coroutine.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from asgiref.sync import sync_to_async


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll `predicate` until it returns a truthy value, and return that
    value; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def eventually(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """`wait_for` from a coroutine, in a thread of its own: not in the one
    thread that sync_to_async shares with the consumer's database calls,
    which it would hold up for the whole wait."""
    return await sync_to_async(wait_for, thread_sensitive=False)(predicate, timeout=timeout, interval=interval,
                                                                  what=what)
