"""The Celery app: configured from Django settings under the CELERY_ namespace.

Workers (see `chat/management/commands/runstack.py` for the exact lines):

- GPU worker: `-Q gpu.<slot> -I workers.gpu_tasks -P solo -c 1
  --prefetch-multiplier 1`. Only it loads the GPU tasks (`-I`), and with
  them torch; every worker loads the CPU tasks (CELERY_IMPORTS). Solo runs tasks
  in the worker's main process, so the CUDA context and the loaded models
  live in one process for its whole life (prefork would fork after CUDA init,
  which CUDA forbids, and would split models across children); one task at a
  time is exactly one owner of the GPU; prefetch 1 with late ack means the
  worker never sits on a second request it cannot start.
- CPU worker: `-Q cpu -P gevent -c 1000` (CPU_WORKER_CONCURRENCY). External
  generations spend their time waiting on sockets: one greenlet per stream
  (gevent patches sockets, so redis-py, httpx and psycopg 3 cooperate)
  holds hundreds of streams in one process, where `-P threads -c 16` held 16
  (docs/BENCHMARKS.md, "Concurrent streams"). The streams share one HTTP
  client per endpoint (a client costs ~17 ms to build), and give their
  database connection back between writes (workers/replies.py).
"""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

app = Celery("chatsite")
app.config_from_object("django.conf:settings", namespace="CELERY")


def _kombu_redis_detached_channel_guard() -> None:
    """Make a kombu Redis channel whose connection was torn down fail with a
    connection error, which every caller already handles, instead of an
    AttributeError, which stops the worker.

    Celery 5.7's `Consumer.on_connection_error_after_connected` (the broker
    went away while the worker ran) first `collect()`s the connection, which
    detaches its transport (`transport.client = None`), then `close()`s it,
    which closes the default channel; with a late-acked message still
    running (the CPU worker's threads), the channel restores it and builds a
    pool from `transport.client.hostname`: `Unrecoverable error:
    AttributeError("'NoneType' object has no attribute 'hostname'")`, and
    the worker exits. The task's own ack, later, on that closed channel
    (`channel.connection = None`) fails the same way. Celery 5.7.0 and kombu
    5.7.0 are the latest releases (no fix yet; cf. kombu #582 and #970, the
    same AttributeError from older close paths). A connection error here
    means: the unacked message stays in Redis's `unacked` hash and is
    redelivered after the visibility timeout (CELERY_BROKER_TRANSPORT_OPTIONS),
    where it finds its reply ended; the failed ack is logged, not fatal.
    Reproduced by tests/test_faults.py
    test_redis_restart_while_an_ollama_reply_streams_keeps_the_cpu_worker.
    """
    from kombu.transport import redis as kombu_redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    original = kombu_redis.Channel._connparams
    if getattr(original, "detached_guard", False):
        return

    def _connparams(self, asynchronous=False):
        if self.connection is None or self.connection.client is None:
            raise RedisConnectionError("the broker connection of this channel was closed")
        return original(self, asynchronous=asynchronous)

    _connparams.detached_guard = True
    kombu_redis.Channel._connparams = _connparams


_kombu_redis_detached_channel_guard()


def _kombu_redis_unacked_without_transaction() -> None:
    """Write and remove a late-acked message's `unacked` entry (its index
    ZADD and hash HSET; on ack, ZREM and HDEL) in one pipeline without
    MULTI/EXEC: four Redis commands per message instead of eight
    (docs/BENCHMARKS.md, "Redis commands per message"). Atomicity buys
    nothing here: the only other reader, `restore_visible`, takes index
    entries older than the visibility timeout, never one being written,
    and skips an index entry whose hash entry is gone."""
    from contextlib import contextmanager

    from kombu.transport import redis as kombu_redis

    if getattr(kombu_redis.QoS.pipe_or_acquire, "untransacted", False):
        return

    @contextmanager
    def pipe_or_acquire(self, pipe=None, client=None):
        if pipe:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as client:
                yield client.pipeline(transaction=False)

    pipe_or_acquire.untransacted = True
    kombu_redis.QoS.pipe_or_acquire = pipe_or_acquire


_kombu_redis_unacked_without_transaction()
