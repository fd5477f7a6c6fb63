"""The chat page while a message waits for the GPU (issue 13), in a real
browser: the queue note on a pending reply, a `gpu_busy` refusal, and the
GPU panel's line for each slot's scheduler.

The page's websocket is answered by the test (Playwright's
route_web_socket), not by the server: the real GPU worker serves a queued
message at once, and its own frames can overtake the dispatcher's queue
note, so a real reply shows the note for an instant or not at all. Here
each frame comes when the test sends it. The web server is real (the page,
its APIs, /api/gpu/ on the suite's Redis); the messages the frames name
are stored, and changed, as the server would store and change them, so
that what the page reads back (once a second while a reply waits, and when
it ends) agrees with the frames.
"""
from __future__ import annotations

import json
import re

import pytest

from chat.models import Conversation, Message, MessageStatus
from tests.support import browser as ui_support
from tests.test_gpu_schedule_view import SLOT, admit, slot  # noqa: F401 (a fixture)

expect = pytest.importorskip("playwright.sync_api").expect

BUSY = "The GPU is busy: it is Ollama's, and this message would wait about 950 s (more than the 900 s allowed)."


@pytest.fixture(scope="module")
def server(request, stack):
    return ui_support.live_server(request, stack)


@pytest.fixture(scope="module")
def browser(server):
    with ui_support.chromium() as chromium:
        yield chromium


class FakeSocket:
    """The page's websocket, answered by the test: each chat.send is
    accepted as `reply`; anything else is sent with `send`."""

    def __init__(self, page):
        self.ws = None
        self.reply: Message | None = None
        page.route_web_socket(re.compile(r"/ws/chat/$"), self.connected)

    def connected(self, ws) -> None:
        self.ws = ws
        ws.on_message(self.received)

    def received(self, text: str) -> None:
        frame = json.loads(text)
        if frame["type"] == "chat.send":
            self.send(type="chat.accepted", client_id=frame["client_id"],
                      conversation=self.reply.conversation_id, message=self.reply.pk)

    def send(self, **frame) -> None:
        self.ws.send(json.dumps(frame))


@pytest.fixture
def page(browser, server, user, demo_model):
    context = ui_support.logged_in_context(browser, server, user, viewport={"width": 1280, "height": 800},
                                           locale="en-US")
    page = ui_support.watched_page(context)
    page.socket = FakeSocket(page)
    yield page
    context.close()
    assert page.errors == [], page.errors


def stored_reply(user, **fields) -> Message:
    """A conversation with a question and its reply, as the server stores them."""
    conversation = Conversation.objects.create(user=user, title="hi")
    Message.objects.create(conversation=conversation, role=Message.Role.USER, content="hi", model_name="local_demo")
    return Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT,
                                  model_name="local_demo", **fields)


def open_and_send(page, model: str = "local_demo"):
    page.goto("/")
    expect(page.locator("#layout")).to_have_attribute("data-socket", "open")
    expect(page.locator(f"#model option[value='{model}']")).to_have_count(1)
    page.select_option("#model", model)
    page.fill("#content", "hi")
    page.press("#content", "Enter")
    reply = page.locator("li.msg.assistant").last
    # chat.accepted has come back: Stop works only for a reply with an id.
    expect(page.get_by_role("button", name="Stop")).to_be_enabled()
    return reply


def test_a_queued_reply_shows_its_place_until_its_text_comes(page, user):
    page.socket.reply = stored_reply(user, status=MessageStatus.QUEUED)
    reply = open_and_send(page)
    message = page.socket.reply.pk
    note = reply.locator(".msg-steps li[data-key='queued']")

    page.socket.send(type="gpu.switch", message=message, phase="queued", owner="ollama", position=2,
                     eta_seconds=11.6)
    expect(note).to_have_text("Queued, place 2 — the GPU is Ollama's; your turn in about 12 s")
    expect(reply.locator(".msg-body")).to_have_text("Waiting in the queue…")
    # A later estimate replaces it; the owner is the reply's own side now.
    page.socket.send(type="gpu.switch", message=message, phase="queued", owner="local", position=1,
                     eta_seconds=0.2)
    expect(note).to_have_text("Queued, place 1; about 1 s")
    expect(reply.locator(".msg-steps li")).to_have_count(1)

    page.socket.send(type="chat.delta", message=message, seq=0, text="Hello")
    expect(reply.locator(".msg-body")).to_have_text("Hello")
    expect(note).to_have_count(0)
    page.socket.send(type="chat.delta", message=message, seq=1, text=" there")
    expect(reply.locator(".msg-body")).to_have_text("Hello there")
    expect(note).to_have_count(0)
    Message.objects.filter(pk=message).update(status=MessageStatus.DONE, content="Hello there", finish_reason="stop")
    page.socket.send(type="chat.done", message=message, finish_reason="stop", usage=None)
    expect(reply.locator(".msg-actions")).to_be_visible()


def test_a_queued_note_goes_when_the_gpu_work_for_the_reply_begins(page, user):
    page.socket.reply = stored_reply(user, status=MessageStatus.QUEUED)
    reply = open_and_send(page, model="ollama_qwen:7b")
    message = page.socket.reply.pk
    page.socket.send(type="gpu.switch", message=message, phase="queued", owner="local", position=1,
                     eta_seconds=4.4)
    expect(reply.locator(".msg-steps li[data-key='queued']")).to_have_text(
        "Queued, place 1 — the GPU is the local models'; your turn in about 4 s")
    page.socket.send(type="gpu.switch", message=message, phase="unloading_local", model="local_demo")
    steps = reply.locator(".msg-steps li")
    expect(steps).to_have_text(["Unloading local_demo from the GPU…"])
    # The dispatcher sends the note after it queued the task, so the GPU
    # worker's first frames can overtake it: a note after them is stale.
    # Frames are handled in order, so once the refusal after it shows, the
    # note has been handled.
    page.socket.send(type="gpu.switch", message=message, phase="queued", owner="local", position=1,
                     eta_seconds=4.4)
    page.socket.send(type="chat.error", message=None, code="bad_frame", detail="after the note")
    expect(page.locator("#alert")).to_have_text("after the note (bad_frame)")
    expect(steps).to_have_text(["Unloading local_demo from the GPU…"])


def test_gpu_busy_shows_its_detail_on_the_reply(page, user):
    page.socket.reply = stored_reply(user, status=MessageStatus.QUEUED)
    reply = open_and_send(page)
    # As chat.dispatch.message_fail does: the message ends, then the frame.
    Message.objects.filter(pk=page.socket.reply.pk).update(status=MessageStatus.ERROR, error_code="gpu_busy",
                                                           error_detail=BUSY)
    page.socket.send(type="chat.error", message=page.socket.reply.pk, code="gpu_busy", detail=BUSY)
    expect(reply.locator(".msg-error")).to_have_text(f"gpu_busy: {BUSY}")
    expect(reply).to_have_class(re.compile(r"\bfailed\b"))
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_gpu_panel_shows_who_waits_and_the_gate(page, slot):  # noqa: F811 (the fixture)
    admit(slot, 1, "local")
    admit(slot, 2, "local")
    admit(slot, 3, "ollama")
    page.goto("/")
    queue = page.locator(f"#gpu-panel [data-slot='{SLOT}'] [data-queue]")
    expect(queue).to_have_text(re.compile(
        r"^waiting: local 2, Ollama 1 · gate closes in [1-4] s · switch ≈ 1\.00 s$"))


def test_gpu_panel_says_so_when_nobody_waits(page, slot):  # noqa: F811 (the fixture)
    page.goto("/")
    queue = page.locator(f"#gpu-panel [data-slot='{SLOT}'] [data-queue]")
    expect(queue).to_have_text("nobody waiting · switch ≈ 1.00 s")
