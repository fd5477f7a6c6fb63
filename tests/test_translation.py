"""Translating a message (CONTRACT §9, issue 15) through the real stack: on
the GPU worker while the local models hold the GPU, on the knowledge
worker's CPU (and saying so) while Ollama does; stored, never twice."""
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from chat.models import Message, ModelConfig, Translation
from chat.translations import CPU_NOTE
from gpu_manager.state import GpuStateStore
from tests.support.sockets import communicator, frames_until, send_and_finish
from tests.support.users import user_create

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


def store() -> GpuStateStore:
    return GpuStateStore(slot=settings.GPU_SLOT)


def translated(message_id: int):
    return lambda f: f.get("message") == message_id and f["type"] in ("message.translation", "chat.error")


async def translate(comm, message_id, target, timeout=60.0) -> dict:
    await comm.send_json_to({"type": "message.translate", "message": message_id, "target": target})
    return (await frames_until(comm, translated(message_id), timeout=timeout))[-1]


async def test_translation_on_the_local_gpu_is_stored_and_never_computed_twice(user, ws_headers, demo_model,
                                                                                demo_engines, workers):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    accepted, frames = await send_and_finish(comm, model="local_demo", content="Hello there.\n\nSecond paragraph.")
    assert frames[-1]["type"] == "chat.done", frames
    reply = accepted["message"]
    frame = await translate(comm, reply, "zh-hans")
    assert frame["type"] == "message.translation", frame
    assert frame["target"] == "zh-hans" and frame["engine"] == "translate_demo" and frame["text"]
    assert "note" not in frame  # the GPU worker translated it: nothing to explain
    assert "translate_demo" in store().read().local_models
    stored = await sync_to_async(Translation.objects.get)(message_id=reply, target="zh-hans")
    assert stored.text == frame["text"] and stored.device == frame["device"]

    # Asked again: the stored translation, at once, with no new computation.
    again = await translate(comm, reply, "zh-hans", timeout=5)
    assert again == frame
    assert await sync_to_async(Translation.objects.filter(message_id=reply).count)() == 1

    # The user's own question translates too; history shows both.
    question = await sync_to_async(lambda: Message.objects.filter(pk__lt=reply).latest("pk").pk)()
    assert (await translate(comm, question, "en"))["type"] == "message.translation"
    from chat.selectors import conversation_messages
    from chat.models import Conversation
    history = await sync_to_async(lambda: conversation_messages(
        conversation=Conversation.objects.get(pk=accepted["conversation"])))()
    assert set(history[1]["translations"]) == {"zh-hans"} and set(history[0]["translations"]) == {"en"}


async def test_translation_while_ollama_holds_the_gpu_runs_on_the_cpu_and_says_why(user, ws_headers, demo_engines,
                                                                                  workers, stack):
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    accepted, frames = await send_and_finish(comm, model="ollama_qwen:7b", content="hello")
    assert frames[-1]["type"] == "chat.done", frames
    assert store().read().owner == "ollama"
    loads_before = len([e for e in store().events(1000) if e["kind"] == "local_load"])
    stack.ollama.clear()
    frame = await translate(comm, accepted["message"], "en")
    assert frame["type"] == "message.translation", frame
    assert frame["device"] == "cpu" and frame["note"] == CPU_NOTE
    state = store().read()
    assert (state.owner, state.local_models) == ("ollama", [])
    assert len([e for e in store().events(1000) if e["kind"] == "local_load"]) == loads_before
    # Ollama was never asked to unload.
    assert not [r for r in stack.ollama.requests if r.body and r.body.get("keep_alive") in (0, "0", "0s")]


async def test_bad_translation_requests_get_clear_errors(user, ws_headers, demo_model, demo_engines, workers):
    other = await sync_to_async(user_create)("eve", "pw-eve-123456")
    comm = communicator(ws_headers)
    assert (await comm.connect())[0]
    accepted, frames = await send_and_finish(comm, model="local_demo", content="hi")
    reply = accepted["message"]
    assert (await translate(comm, reply, "fr"))["code"] == "bad_target"
    assert (await translate(comm, reply + 1000, "en"))["code"] == "unknown_message"
    from tests.support.sockets import session_cookie
    theirs = communicator([(b"cookie", f"sessionid={await sync_to_async(session_cookie)(other)}".encode()),
                           (b"origin", b"http://localhost")])
    assert (await theirs.connect())[0]
    assert (await translate(theirs, reply, "en"))["code"] == "unknown_message"
    await sync_to_async(ModelConfig.objects.filter(name="translate_demo").update)(enabled=False)
    assert (await translate(comm, reply, "en"))["code"] == "translation_unavailable"
    assert await sync_to_async(Translation.objects.count)() == 0
