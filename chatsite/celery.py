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
- CPU worker: `-Q cpu -P threads -c 16`. External generations spend their
  time waiting on sockets; threads overlap those waits without forking and
  share one HTTP client per endpoint (a client costs ~17 ms to build).
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
