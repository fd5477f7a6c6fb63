"""`make run` (CONTRACT §1): the whole stack in the foreground until Ctrl-C."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from chatsite import queues
from chatsite.redis_server import PrivateRedis, RedisServerError, port_is_free

#: Seconds a child gets to finish after SIGTERM before SIGKILL. A GPU worker
#: in a warm shutdown waits for its current generation; with late ack an
#: interrupted message is redelivered, so waiting longer buys nothing.
STOP_TIMEOUT = 10.0
#: How often the foreground loop checks whether a child has exited.
POLL_SECONDS = 0.2
#: A worker that exits is started again, as compose's `restart:
#: unless-stopped` does: a worker can die of a fault it could have survived
#: (a Redis restart, chatsite/celery.py), and one dead worker must not take
#: the web server and the other worker down with it. One that exits this
#: many times within RESTART_WINDOW seconds is broken (a bad setting, an
#: import error), not unlucky: then the stack stops, with its status.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
#: The children that are started again when they exit (the CPU workers are
#: cpu-worker, cpu-worker-2, ...); the web server or Redis exiting stops
#: the stack.
RESTARTED = ("gpu-worker", "cpu-worker", "knowledge-worker")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stack_commands(*, host: str, port: int, cpu_workers: int | None = None) -> list[tuple[str, list[str]]]:
    """The processes of the stack as (name, argv); the worker options are
    explained in chatsite/celery.py. `cpu_workers`: CPU worker processes
    (settings.CPU_WORKER_PROCESSES), named cpu-worker, cpu-worker-2, ...
    and cpu@, cpu2@, ... as Celery nodes."""
    python = sys.executable
    cpu_workers = settings.CPU_WORKER_PROCESSES if cpu_workers is None else cpu_workers
    return [
        ("web", [
            python, "-m", "uvicorn", "chatsite.asgi:application",
            "--host", host, "--port", str(port), "--ws", "websockets-sansio", "--lifespan", "off",
        ]),
        ("gpu-worker", [
            python, "-m", "celery", "-A", "chatsite", "worker", "-Q", queues.gpu_queue(settings.GPU_SLOT),
            "-I", queues.GPU_TASK_MODULE, "-P", "solo", "-c", "1", "--prefetch-multiplier", "1", "-n", "gpu@%h",
            "--loglevel", "INFO",
        ]),
        # Knowledge bases and translation on the CPU (chatsite/queues.py):
        # a thread pool, so that a reply's retrieval never waits for an
        # ingestion; torch's own threads do the arithmetic.
        ("knowledge-worker", [
            python, "-m", "celery", "-A", "chatsite", "worker", "-Q", queues.KNOWLEDGE_QUEUE,
            "-I", queues.KNOWLEDGE_TASK_MODULE, "-P", "threads", "-c", str(settings.KNOWLEDGE_WORKER_CONCURRENCY),
            "-n", "knowledge@%h", "--loglevel", "INFO",
        ]),
        *((f"cpu-worker-{n}" if n > 1 else "cpu-worker", [
            python, "-m", "celery", "-A", "chatsite", "worker", "-Q", queues.CPU_QUEUE,
            "-P", "gevent", "-c", str(settings.CPU_WORKER_CONCURRENCY), "-n", f"cpu{n if n > 1 else ''}@%h",
            "--loglevel", "INFO",
        ]) for n in range(1, cpu_workers + 1)),
    ]


class _Stop(Exception):
    """A stop signal arrived; raised by our own checks, never by the handler."""


class Command(BaseCommand):
    help = "Run the web server, a GPU worker and the CPU workers (and a private Redis) until Ctrl-C."

    def handle(self, *args, **options):
        host = os.environ.get("HOST", "127.0.0.1")
        port = int(os.environ.get("PORT", "8000"))
        # The handler only records the signal; the code checks for it at safe
        # points. Raising from the handler (as SIGINT's default does) can land
        # inside Popen.poll() while it holds its internal lock, after which
        # that child's wait() hangs forever. SIGTERM and SIGHUP take the same
        # path as Ctrl-C, so that however the stack is stopped, its children
        # and Redis are stopped with it.
        signals: list[int] = []

        def stop_check():
            if signals:
                raise _Stop

        for signum in _STOP_SIGNALS:
            signal.signal(signum, lambda signum, frame: signals.append(signum))

        env = dict(os.environ)
        # Children's logs must reach the terminal as they happen, not when a
        # pipe buffer fills.
        env.setdefault("PYTHONUNBUFFERED", "1")
        redis_server = None
        children: dict[str, subprocess.Popen] = {}
        failed = None
        try:
            if not env.get("REDIS_URL"):
                redis_server = self._redis_start()
                env["REDIS_URL"] = redis_server.url
            stop_check()
            # A Ctrl-C also reaches this child, which then fails: a stop, not an error.
            demo_status = self._demo_model_create(env)
            stop_check()
            if demo_status != 0:
                raise CommandError(f"manage.py demo_model failed with status {demo_status}")
            login = self._login_ensure(base_url=f"http://{host}:{port}")
            commands = dict(stack_commands(host=host, port=port))

            def spawn(name: str) -> subprocess.Popen:
                return subprocess.Popen(
                    commands[name], env=env, cwd=settings.BASE_DIR,
                    # Own process groups: Ctrl-C reaches only this command,
                    # which stops the children in order, Redis last.
                    process_group=0,
                )

            children = {name: spawn(name) for name in commands}
            restarts: dict[str, list[float]] = {}
            announced = False
            while True:
                stop_check()
                exited = _exited({**children, **({"redis": redis_server.process} if redis_server else {})})
                if exited is not None:
                    name, status = exited
                    failed = f"{name} (status {status})"
                    if not _restart_allowed(name, restarts):
                        break
                    self.stderr.write(f"{failed} exited; starting it again")
                    children[name] = spawn(name)
                    failed = None
                # Announced once the web server answers, so that the URL is
                # the last thing on the screen rather than above its start-up log.
                if not announced and _port_accepts(host, port):
                    self.stdout.write(self.style.SUCCESS(f"Serving on http://{host}:{port}/"))
                    self.stdout.write(login)
                    self.stdout.write("Press Ctrl-C to stop.")
                    announced = True
                time.sleep(POLL_SECONDS)
            self.stderr.write(f"{failed} exited; stopping the stack")
        except _Stop:
            self.stdout.write("Stopping…")
        finally:
            _children_stop(list(children.values()), signals=signals)
            # Last: the workers still talk to Redis while they shut down.
            if redis_server is not None:
                redis_server.stop()
        if failed is not None:
            raise CommandError(f"{failed} exited on its own; the stack was stopped")

    def _redis_start(self) -> PrivateRedis:
        port_file = Path(settings.VAR_DIR) / "redis.port"
        saved = _port_read(port_file)
        # The saved port keeps `manage.py` commands started before this run
        # (which read var/redis.port through settings) pointing at the right place.
        port = saved if saved is not None and port_is_free(saved) else None
        server = PrivateRedis(directory=Path(settings.VAR_DIR) / "redis", port=port)
        try:
            server.start()
        except RedisServerError as exc:
            raise CommandError(str(exc)) from exc
        # settings.py builds REDIS_URL from this file when the variable is unset.
        _text_write_atomic(port_file, f"{server.port}\n")
        self.stdout.write(f"Private Redis on {server.url} (log: {server.log_path})")
        return server

    def _demo_model_create(self, env: dict[str, str]) -> int:
        # A separate process: it imports torch and transformers, which this
        # long-lived supervisor has no use for.
        return subprocess.run(
            [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "demo_model"],
            env=env, cwd=settings.BASE_DIR,
        ).returncode

    def _login_ensure(self, *, base_url: str) -> str:
        """Create the first superuser when there is none; return how to log in."""
        user_model = get_user_model()
        password_file = Path(settings.VAR_DIR) / "admin-password.txt"
        login_url = f"{base_url}{settings.LOGIN_URL}"
        if not user_model.objects.exists():
            password = secrets.token_urlsafe(12)
            user_model.objects.create_superuser(username="admin", email="", password=password)
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as stream:
                stream.write(f"{password}\n")
            return (
                f"Log in at {login_url} as admin with password {password} "
                f"(saved in {password_file})."
            )
        if password_file.exists() and user_model.objects.filter(username="admin").exists():
            return f"Log in at {login_url} as admin with the password in {password_file}."
        return (
            f"Log in at {login_url} with an existing account, or create one with "
            f"`.venv/bin/python manage.py createsuperuser`."
        )


def _exited(children: dict[str, subprocess.Popen]) -> tuple[str, int] | None:
    """The name and exit status of the first child that has exited."""
    for name, child in children.items():
        if child.poll() is not None:
            return name, child.returncode
    return None


def _restart_allowed(name: str, restarts: dict[str, list[float]]) -> bool:
    """Whether the child `name`, which exited, is started again: a worker,
    unless it was already RESTART_LIMIT times within RESTART_WINDOW."""
    if not name.startswith(RESTARTED):
        return False
    now = time.monotonic()
    recent = [t for t in restarts.get(name, []) if now - t < RESTART_WINDOW]
    restarts[name] = [*recent, now]
    return len(recent) < RESTART_LIMIT


def _port_accepts(host: str, port: int) -> bool:
    # A wildcard bind is reached through loopback.
    target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=POLL_SECONDS):
            return True
    except OSError:
        return False


def _children_stop(children: list[subprocess.Popen], *, signals: list[int]) -> None:
    """SIGTERM all, wait up to STOP_TIMEOUT, then SIGKILL what is left;
    one more stop signal (a second Ctrl-C) skips the wait."""
    patience = len(signals)
    for child in children:
        _group_signal(child, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while len(signals) <= patience and time.monotonic() < deadline:
        if all(child.poll() is not None for child in children):
            return
        time.sleep(0.05)
    for child in children:
        _group_signal(child, signal.SIGKILL)
        child.wait()


def _group_signal(child: subprocess.Popen, signum: int) -> None:
    # Each child leads its own group; signalling the group also reaches any
    # process it started (a pool, a compiler) that would otherwise outlive it.
    if child.poll() is None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass


def _port_read(port_file: Path) -> int | None:
    # A damaged or hand-edited file only costs the saved port, not the start.
    try:
        port = int(port_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def _text_write_atomic(path: Path, text: str) -> None:
    # A `manage.py` command starting right now must read the old port or the
    # new one, never an empty file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
