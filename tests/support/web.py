"""The web process exactly as `make run` starts it (uvicorn, from runstack's
command list) on a free port against the test database: the one web-server
helper of the suite (the browser tests, the OpenAI-compatible API tests, the
web-restart fault test and the soak run all use it). A test can kill it and
start it again on the same port."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from tests.support import ROOT
from tests.support.net import free_port
from tests.support.waiting import wait_for

#: Seconds for uvicorn to answer /healthz: it imports Django, torch and the
#: rest in ~2 s; a loaded 2-core machine needs a good margin.
START_TIMEOUT = 60.0
#: Django's guard against ORM calls from a thread with a running event loop;
#: the browser tests lift it in their own process (tests/support/browser.py),
#: never in the server's.
ASYNC_UNSAFE = "DJANGO_ALLOW_ASYNC_UNSAFE"


class WebServer:
    def __init__(self, *, log_dir: Path, database_url: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"web-{self.port}.log"
        self.env = {**os.environ, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop(ASYNC_UNSAFE, None)  # the server keeps Django's guard
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it (again, after `kill()` or `stop()`: the same port) and
        wait until /healthz answers."""
        from chat.management.commands.runstack import stack_commands

        argv = dict(stack_commands(host="127.0.0.1", port=self.port))["web"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the web server exited:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=START_TIMEOUT, interval=0.1, what="the web server")

    def kill(self) -> None:
        """SIGKILL, as in a crash: open sockets drop without a close frame."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def socket(self, session_id: str) -> connect:
        """A logged-in chat socket (the `websockets` package, as a browser
        connects: session cookie, and this server's own Origin)."""
        return connect(f"ws://127.0.0.1:{self.port}/ws/chat/", origin=self.url, proxy=None,
                       additional_headers={"Cookie": f"sessionid={session_id}"}, open_timeout=30)
