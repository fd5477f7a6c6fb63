"""/metrics in Prometheus's text format, fed by the real workers."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.sockets import communicator, send_and_finish


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
    response = await async_client.get("/metrics")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    found = samples(response.content.decode())
    assert found[("chat_messages_total", (("kind", "local"), ("status", "done")))] >= 1
    assert found[("chat_messages_total", (("kind", "ollama"), ("status", "done")))] >= 1
    assert found[("chat_reply_first_token_seconds_count", (("kind", "ollama"),))] >= 1
    assert found[("chat_queue_depth", (("queue", "gpu.0"),))] >= 0
    assert found[("gpu_transitions_total", (("kind", "local_unload"), ("slot", "0")))] >= 1
    assert found[("gpu_owner", (("owner", "ollama"), ("slot", "0")))] == 1
    assert found[("gpu_resident_models", (("model", "qwen:7b"), ("side", "ollama"), ("slot", "0")))] == 1
