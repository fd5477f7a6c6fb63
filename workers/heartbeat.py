"""Worker liveness for /readyz, through Redis keys that expire.

Celery's remote control (ping, inspect) is answered by a worker's main
loop, which the GPU worker's solo pool blocks for the whole of a task: a
busy GPU worker would look dead for as long as it loads or generates. A
daemon thread refreshing a key with a TTL is alive exactly as long as the
process is.
"""
from __future__ import annotations

import threading

from django.conf import settings

from chatsite.redis_client import redis_client

KEY_PREFIX = "worker:alive"


def heartbeat_start(*, hostname: str, queues: list[str]) -> threading.Thread:
    stop = threading.Event()

    def beat() -> None:
        client = redis_client()
        while not stop.is_set():
            pipe = client.pipeline()
            for queue in queues:
                pipe.set(f"{KEY_PREFIX}:{queue}:{hostname}", "1", ex=settings.WORKER_HEARTBEAT_TTL)
            pipe.execute()
            stop.wait(settings.WORKER_HEARTBEAT_SECONDS)

    thread = threading.Thread(target=beat, name="worker-heartbeat", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread


def heartbeat_stop(thread: threading.Thread, *, hostname: str, queues: list[str]) -> None:
    """On a clean shutdown, stop counting at once instead of after the TTL."""
    thread.stop.set()  # type: ignore[attr-defined]
    redis_client().delete(*[f"{KEY_PREFIX}:{queue}:{hostname}" for queue in queues])


def workers_alive() -> dict[str, list[str]]:
    """Queue name -> hostnames of the workers consuming it now."""
    alive: dict[str, list[str]] = {}
    for key in redis_client().scan_iter(match=f"{KEY_PREFIX}:*", count=100):
        queue, hostname = key.removeprefix(f"{KEY_PREFIX}:").split(":", 1)
        alive.setdefault(queue, []).append(hostname)
    return alive
