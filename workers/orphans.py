"""Give a restarted GPU worker the messages its predecessor had taken.

With late acknowledgement, a message a worker has taken sits in the Redis
transport's `unacked` hash until it is acknowledged; if the worker dies, the
message goes back to its queue only after the broker's visibility timeout
(CELERY_BROKER_TRANSPORT_OPTIONS: 22 minutes, above any task's run). A slot
has one GPU worker (one solo worker per GPU, on its own `gpu.<slot>`
queue), so when that worker starts, every message of its queue that was
delivered before it started is its dead predecessor's: the one it was
running (whose reply gpu_worker_recover ends) and the next one it had
already taken. Left there, the second would wait 22 minutes with its reply
`queued`. This puts them back at the head of the queue at once, oldest
first. Running one again is harmless: a finished reply is skipped and a
claimed one left to its holder (chat.generation.reply_claim).
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def orphans_restore(*, app, queue: str, delivered_before: float) -> int:
    """Put back on `queue` the messages of it that were delivered before
    `delivered_before` (Unix time) and never acknowledged; return how many.
    Only for a queue with a single consumer: another live consumer's
    messages would run twice."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        tags = client.zrangebyscore(channel.unacked_index_key, "-inf", delivered_before)
        restored = 0
        # kombu consumes from the right; restore_by_tag pushes there: the
        # newest first, so that the oldest is taken first.
        for tag in reversed(tags):
            raw = client.hget(channel.unacked_key, tag)
            if raw is None:  # acknowledged or restored meanwhile
                continue
            _payload, _exchange, routing_key = json.loads(raw)
            if routing_key != queue:
                continue
            channel.qos.restore_by_tag(tag)
            restored += 1
    if restored:
        log.warning("%s: %d message(s) taken by a worker that died put back at the head of the queue",
                    queue, restored)
    return restored
