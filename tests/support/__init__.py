"""Helpers the tests import: one of each, each in one place.

- `waiting`: `wait_for` (poll a condition with a timeout, fail with a named
  reason) and `eventually` (the same from a coroutine).
- `net`: `free_port`.
- `web`: `WebServer`, the web process exactly as `make run` starts it.
- `workers`: `Workers` (the GPU and CPU Celery workers as subprocesses) and
  `test_database_url`.
- `sockets`: the in-process chat socket (`communicator`), frames until a
  condition, one message sent to its end, the session cookie.
- `browser`: chromium through Playwright and the one live server the
  browser tests share.
- `api`: helpers of the OpenAI-compatible API and batch tests.
- `users`: users with Django's real password hasher run once per password.

Fixtures live in tests/conftest.py; the private Redis and the fake outside
servers are started by the plugin tests/stack.py; the fakes themselves are
in tests/fakes/ (real servers that bind their own ports). This package's
`__init__`, `net` and `waiting` need no Django, so that anything may import
them before Django is set up (tests/stack.py runs before it is).
"""
from pathlib import Path

#: The repository's root.
ROOT = Path(__file__).resolve().parents[2]
