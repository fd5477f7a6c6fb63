"""Log lines carry the task and message ids, as JSON with LOG_FORMAT=json."""
import io
import json
import logging

import pytest

from chatsite.logs import ContextFilter, JsonFormatter, message_id_var
from tests.support.sockets import communicator, send_and_finish
from tests.support.waiting import wait_for


def test_json_lines_carry_the_message_id():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    token = message_id_var.set(42)
    try:
        logger.warning("switching %s", "now")
    finally:
        message_id_var.reset(token)
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["message"] == "switching now" and line["message_id"] == 42 and line["level"] == "WARNING"
    assert "task_id" in line and line["logger"] == "test.logs"


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_reply_can_be_traced_in_the_gpu_worker_log(ws_headers, demo_model, workers):
    comm = communicator(ws_headers)
    await comm.connect()
    await send_and_finish(comm, model="local_demo", content="own the GPU first")
    accepted, _ = await send_and_finish(comm, model="ollama_qwen:7b", content="trace me")
    await comm.disconnect()
    tag = f"message={accepted['message']}]"
    # The GPU worker logged its acquire step (the local model's unload, the
    # owner change) under this message's id, with a task id beside it.
    lines = wait_for(lambda: [l for l in workers.log("gpu").splitlines() if tag in l], timeout=10,
                     what="a GPU worker log line for the message")
    assert all("task=None" not in line for line in lines), lines
