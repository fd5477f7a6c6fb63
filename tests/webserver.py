"""The web process exactly as `make run` starts it (uvicorn, from runstack's
command list) against the test database, which a test can kill and start
again on the same port, and a websocket client for it (the `websockets`
package, as a browser would connect: session cookie and Origin)."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from pathlib import Path

import httpx
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import ROOT, wait_for

#: Seconds for uvicorn to answer /healthz: it imports Django, torch and the
#: rest in ~2 s; a loaded 2-core machine needs a good margin.
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebServer:
    def __init__(self, *, log_dir: Path, database_url: str, env: dict | None = None):
        self.port = free_port()
        self.log_path = Path(log_dir) / f"web-{self.port}.log"
        self.env = {**os.environ, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
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
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def socket(self, session_id: str) -> "connect":
        """A logged-in chat socket, from this server's own origin."""
        return connect(f"ws://127.0.0.1:{self.port}/ws/chat/", origin=self.url, proxy=None,
                       additional_headers={"Cookie": f"sessionid={session_id}"}, open_timeout=30)


async def receive(ws: ClientConnection, *, timeout: float) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def frames_until(ws: ClientConnection, done, *, timeout: float = 60.0) -> list[dict]:
    """Receive frames until `done(frame)` is true for one; return them all."""
    frames = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise AssertionError(f"no final frame within {timeout} s; got {frames}")
        frames.append(await receive(ws, timeout=remaining))
        if done(frames[-1]):
            return frames
