"""The real stack for the benchmarks that go through it, started the way
`make run` starts it, and a websocket client that times every reply.

`BenchStack` brings up, in a temporary var/ directory (CHAT_VAR_DIR): a
private Redis on a free port, the fake Ollama and OpenAI servers in a
process of their own (bench/fakes.py), the database (migrate), the demo
model and a user, then the web server (uvicorn with `make run`'s exact
command line, or daphne), the GPU worker and a CPU worker with the command
lines of `chat.management.commands.runstack.stack_commands`. It is ready
when /readyz answers 200. Settings are `make run`'s defaults.

`Conn` is one logged-in websocket; `Conn.send()` returns a `Reply` whose
times are filled in as its frames arrive, so that many messages can be in
flight on one socket (the open-loop run).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import websockets

from bench.common import CACHE, ROOT

READY_TIMEOUT = float(os.environ.get("BENCH_READY_TIMEOUT", 120))  # a cold start on a busy 2-core machine: torch and celery imports
USERNAME = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Fakes:
    """bench/fakes.py, in a process of its own; `urls` holds its addresses."""

    def __init__(self, var: Path):
        self.var = var
        self.proc: subprocess.Popen | None = None
        self.urls: dict = {}

    def start(self) -> "Fakes":
        ready = self.var / "fakes.json"
        log = open(self.var / "fakes.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fakes.py"), "--ready-file", str(ready)],
                                     cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fake servers did not start: {(self.var / 'fakes.log').read_text()}")
            time.sleep(0.05)
        self.urls = json.loads(ready.read_text())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()

    def config(self, server: str, **attrs) -> None:
        httpx.post(f"{self.urls[server]}/_bench/config", json=attrs, timeout=5).raise_for_status()

    def stats(self, server: str) -> dict:
        return httpx.get(f"{self.urls[server]}/_bench/stats", timeout=5).json()

    def recordings(self, server: str) -> dict:
        return httpx.get(f"{self.urls[server]}/_bench/recordings", timeout=30).json()


class BenchStack:
    def __init__(self, *, asgi: str = "uvicorn", keep: bool = False, env: dict[str, str] | None = None,
                 cpu_workers: int | None = None):
        """`env`: settings added to every process's environment (a
        benchmark's own, e.g. GPU_SCHEDULE), over `make run`'s defaults.
        `cpu_workers`: CPU worker processes (`make run`'s by default)."""
        self.cpu_workers = cpu_workers
        if asgi not in ("uvicorn", "daphne"):
            raise ValueError(asgi)
        self.asgi = asgi
        self.keep = keep
        self.extra_env = dict(env or {})
        self.var = Path(tempfile.mkdtemp(prefix=f"chat-bench-{asgi}-"))
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv: dict[str, list[str]] = {}
        self.redis = None
        self.fake_servers = Fakes(self.var)
        self.fakes: dict = {}
        self.cookie = ""

    # --- lifecycle -----------------------------------------------------------
    def start(self) -> "BenchStack":
        from chatsite.redis_server import PrivateRedis

        started = time.monotonic()
        self.redis = PrivateRedis(directory=self.var / "redis")
        redis_url = self.redis.start()
        self.fakes = self.fake_servers.start().urls
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "CHAT_VAR_DIR": str(self.var),
            "OLLAMA_BASE_URL": self.fakes["ollama"],
            "OPENAI_BASE_URL": self.fakes["openai"] + "/v1",
            "OPENAI_API_KEY": self.fakes["openai_key"],
            # Built once per machine, like the 1 GB model: the demo model is
            # the same files every time.
            "DEMO_MODEL_DIR": str(CACHE / "local_demo"),
            "DJANGO_SUPERUSER_USERNAME": USERNAME,
            "DJANGO_SUPERUSER_PASSWORD": self.password,
            "DJANGO_SUPERUSER_EMAIL": "bench@example.invalid",
            "PYTHONUNBUFFERED": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            # One user sends hundreds of messages a minute here: the
            # per-user rate limit (20 a minute by default) is off.
            "CHAT_RATE_LIMIT_MESSAGES": "0",
            **self.extra_env,
        }
        subprocess.run([sys.executable, "manage.py", "shell", "-c", (
            "from django.core.management import call_command as c; c('migrate', verbosity=0); "
            "c('demo_model'); c('createsuperuser', interactive=False, verbosity=0)")],
            cwd=ROOT, env=self.env, check=True, stdout=subprocess.DEVNULL)
        from chat.management.commands.runstack import stack_commands

        for name, argv in stack_commands(host="127.0.0.1", port=self.port, cpu_workers=self.cpu_workers):
            argv = [a.replace("@%h", "@bench") for a in argv]
            if name == "web" and self.asgi == "daphne":
                argv = [str(Path(sys.executable).with_name("daphne")), "-b", "127.0.0.1", "-p", str(self.port),
                        "chatsite.asgi:application"]
            self._spawn(name, argv, self.env)
        self._wait(self._ready, "/readyz")
        self.cookie = self._login()
        self.start_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.fake_servers.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.keep:
            print(f"kept {self.var}")
        else:
            shutil.rmtree(self.var, ignore_errors=True)

    def __enter__(self) -> "BenchStack":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def restart(self, name: str, **env: str) -> None:
        """Stop one process of the stack and start it again with `env` added
        (a what-if: the same command line under another setting). A worker
        is ready again when it serves the next message sent to it."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        self._spawn(name, self.argv[name], {**self.env, **env})

    @contextlib.contextmanager
    def cpu_workers_only(self, count: int):
        """Only the first `count` CPU worker processes run in the block (a
        figure per process); the others are stopped, and started again after."""
        extra = [name for name in self.procs if name.startswith("cpu-worker-")
                 and int(name.rsplit("-", 1)[1]) > count]
        for name in extra:
            os.killpg(self.procs[name].pid, signal.SIGTERM)
            self.procs[name].wait(timeout=30)
        try:
            yield
        finally:
            for name in extra:
                self._spawn(name, self.argv[name], self.env)

    def restart_all(self, **env: str) -> None:
        """Restart the web server and both workers with `env` added for good
        (workers and the web process read settings at start), and wait until
        /readyz answers again. Redis, the fakes and the database stay."""
        self.env.update(env)
        for name in list(self.procs):
            self.restart(name)
        self._wait(self._ready, "/readyz")

    def shell(self, code: str) -> str:
        """Run `code` in `manage.py shell` under the stack's settings; its stdout."""
        return subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=self.env,
                              check=True, capture_output=True, text=True).stdout

    def _spawn(self, name: str, argv: list[str], env) -> None:
        self.argv[name] = argv
        log = open(self.var / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, process_group=0)

    def _wait(self, predicate, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while not predicate():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited while waiting for {what}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _login(self) -> str:
        with httpx.Client(base_url=self.base) as client:
            page = client.get("/accounts/login/")
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
            answer = client.post("/accounts/login/", data={"username": USERNAME, "password": self.password,
                                                           "csrfmiddlewaretoken": token})
            if answer.status_code != 302:
                raise RuntimeError(f"login failed ({answer.status_code})")
            return "; ".join(f"{k}={v}" for k, v in client.cookies.items())

    def log(self, name: str) -> str:
        path = self.var / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def fake_config(self, server: str, **attrs) -> None:
        self.fake_servers.config(server, **attrs)

    def fake_stats(self, server: str) -> dict:
        return self.fake_servers.stats(server)

    def fake_recordings(self, server: str) -> dict:
        return self.fake_servers.recordings(server)

    async def connect(self) -> "Conn":
        ws = await websockets.connect(self.base.replace("http", "ws", 1) + "/ws/chat/", max_size=None,
                                      additional_headers={"Cookie": self.cookie, "Origin": self.base})
        return Conn(ws)


@contextlib.contextmanager
def stacks_started(asgi_list: list[str], *, keep: bool = False):
    """One stack per ASGI server, started side by side (their start-ups
    mostly wait on imports), all stopped on the way out."""
    stacks = {asgi: BenchStack(asgi=asgi, keep=keep) for asgi in asgi_list}
    try:
        with ThreadPoolExecutor(len(stacks)) as pool:
            for future in [pool.submit(stack.start) for stack in stacks.values()]:
                future.result()
        for asgi, stack in stacks.items():
            print(f"{asgi}: stack up in {stack.start_seconds:.0f} s", flush=True)
        yield stacks
    finally:
        for stack in stacks.values():
            stack.stop()


def one_stack_main(parser, measure, report, **stack_options) -> None:
    """A benchmark's main on one fresh stack: its arguments (with `--asgi`
    and `--keep`), the stack up (`stack_options`: BenchStack's),
    `measure(stack, args)` in an event loop, then `report(raw, args)` once
    the stack is down."""
    args = parser.parse_args()
    with BenchStack(asgi=args.asgi, keep=args.keep, **stack_options) as stack:
        print(f"{args.asgi}: stack up in {stack.start_seconds:.0f} s", flush=True)
        raw = asyncio.run(measure(stack, args))
    report(raw, args)


# --- the websocket client ----------------------------------------------------

@dataclass
class Reply:
    sent: float  # when the send was due (open loop) or made
    accepted: float | None = None
    first: float | None = None  # first chat.delta
    done: float | None = None  # chat.done or chat.error
    end: dict | None = None
    message: int | None = None
    seqs: list[int] = field(default_factory=list)
    text: str = ""
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ok(self) -> bool:
        return self.end is not None and self.end.get("type") == "chat.done"

    @property
    def to_first(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def to_done(self) -> float | None:
        return None if self.done is None else self.done - self.sent

    @property
    def gapless(self) -> bool:
        return self.seqs == list(range(len(self.seqs)))


_client_ids = itertools.count()


class Conn:
    """One websocket; a reader task files every frame under its reply."""

    def __init__(self, ws):
        self.ws = ws
        self.by_client: dict[str, Reply] = {}
        self.by_message: dict[int, Reply] = {}
        self.early: dict[int, list[tuple[float, dict]]] = {}
        #: End frames (chat.done / chat.error) seen per message: one each.
        self.ends: collections.Counter = collections.Counter()
        self.reader = asyncio.create_task(self._read())

    async def send(self, model: str, content: str, *, due: float | None = None) -> Reply:
        client_id = f"b{next(_client_ids)}"
        reply = Reply(sent=due if due is not None else time.perf_counter())
        self.by_client[client_id] = reply
        await self.ws.send(json.dumps({"type": "chat.send", "model": model, "content": content,
                                       "conversation": None, "client_id": client_id}))
        return reply

    async def ask(self, model: str, content: str, timeout: float = 120.0) -> Reply:
        reply = await self.send(model, content)
        await asyncio.wait_for(reply.finished.wait(), timeout)
        return reply

    async def _read(self) -> None:
        async for raw in self.ws:
            now = time.perf_counter()
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "chat.accepted":
                reply = self.by_client.pop(frame["client_id"])
                reply.accepted, reply.message = now, frame["message"]
                self.by_message[frame["message"]] = reply
                for at, early in self.early.pop(frame["message"], []):
                    self._file(reply, at, early)
                continue
            if frame.get("message") is None:
                raise RuntimeError(f"error frame: {frame}")
            if kind in ("chat.done", "chat.error"):
                self.ends[frame["message"]] += 1
            if frame["message"] in self.by_message:
                self._file(self.by_message[frame["message"]], now, frame)
            else:  # cannot happen with Channels' in-order dispatch; kept safe anyway
                self.early.setdefault(frame["message"], []).append((now, frame))

    def _file(self, reply: Reply, now: float, frame: dict) -> None:
        kind = frame["type"]
        if kind == "chat.delta":
            reply.first = reply.first or now
            reply.seqs.append(frame["seq"])
            reply.text += frame["text"]
        elif kind in ("chat.done", "chat.error"):
            reply.done, reply.end = now, frame
            del self.by_message[frame["message"]]
            reply.finished.set()

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()
