"""/metrics in Prometheus's text format, fed by the real workers."""
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asgiref.sync import async_to_sync

from chat.metrics import message_observe
from tests.support.sockets import communicator, send_and_finish
from tests.support.waiting import eventually


def samples(text: str) -> dict:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_metrics_count_replies_switches_and_queues(ws_headers, demo_model, workers, async_client):
    comm = communicator(ws_headers)
    await comm.connect()
    await send_and_finish(comm, model="local_demo", content="one")
    await send_and_finish(comm, model="ollama_qwen:7b", content="two")
    await comm.disconnect()

    async def scraped() -> dict:
        response = await async_client.get("/metrics")
        assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
        return samples(response.content.decode())

    # The workers write their counts within METRICS_FLUSH_SECONDS.
    flushed = [("chat_messages_total", (("kind", "local"), ("status", "done"))),
               ("chat_messages_total", (("kind", "ollama"), ("status", "done"))),
               ("chat_reply_first_token_seconds_count", (("kind", "ollama"),))]
    await eventually(lambda: all(k in async_to_sync(scraped)() for k in flushed), timeout=10,
                     what="the workers' metrics")
    found = await scraped()
    assert found[("chat_messages_total", (("kind", "local"), ("status", "done")))] >= 1
    assert found[("chat_messages_total", (("kind", "ollama"), ("status", "done")))] >= 1
    assert found[("chat_reply_first_token_seconds_count", (("kind", "ollama"),))] >= 1
    assert found[("chat_queue_depth", (("queue", "gpu.0"),))] >= 0
    assert found[("gpu_transitions_total", (("kind", "local_unload"), ("slot", "0")))] >= 1
    assert found[("gpu_owner", (("owner", "ollama"), ("slot", "0")))] == 1
    assert found[("gpu_resident_models", (("model", "qwen:7b"), ("side", "ollama"), ("slot", "0")))] == 1


@pytest.mark.django_db
def test_a_histogram_keeps_one_count_per_bucket_and_is_scraped_cumulative(client, stack):
    """Each observation costs two Redis commands (its bucket and the sum),
    not one per bucket; the scrape adds the buckets up."""
    kind = f"test-{time.time_ns()}"
    for seconds in (0.005, 0.3, 0.3, 400.0):
        message_observe(kind=kind, status="done", seconds={"finished": seconds})
    found = samples(client.get("/metrics").content.decode())

    def bucket(le: str) -> float:
        return found[("chat_reply_finished_seconds_bucket", (("kind", kind), ("le", le)))]

    assert [bucket(le) for le in ("0.01", "0.25", "0.5", "300.0", "+Inf")] == [1, 1, 3, 3, 4]
    assert found[("chat_reply_finished_seconds_count", (("kind", kind),))] == 4
    assert found[("chat_reply_finished_seconds_sum", (("kind", kind),))] == pytest.approx(400.605)
