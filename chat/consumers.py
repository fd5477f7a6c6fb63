"""The chat websocket (CONTRACT §4): decode and validate frames, call the
chat services, and relay the events that tasks send to a reply's group."""
from __future__ import annotations

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from chat import services
from chat.jsonbody import BadJson, json_object
from chat.dispatch import queued_frame
from chat.relay import message_group
from chat.services import ChatInputError
from chat.translations import translation_request
from chatsite.errors import CodedError

#: Close code for an anonymous socket (CONTRACT §4), after the HTTP 401 it mirrors.
CLOSE_UNAUTHENTICATED = 4401
CLIENT_ID_MAX = 100


class ChatConsumer(AsyncJsonWebsocketConsumer):
    HANDLERS = {"chat.send": "chat_send", "chat.cancel": "chat_cancel", "message.translate": "message_translate"}

    async def connect(self) -> None:
        self.user = self.scope.get("user")
        # Accept, then close with our code: a socket refused during the
        # handshake reaches the browser as 1006 with no reason.
        await self.accept()
        if self.user is None or not self.user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        # Replies still streaming from an earlier socket keep streaming here.
        for message_id in await database_sync_to_async(services.messages_unfinished)(user=self.user):
            await self.channel_layer.group_add(message_group(message_id), self.channel_name)

    async def receive(self, text_data=None, bytes_data=None) -> None:
        try:
            frame = self._decode(text_data)
            type_ = frame.get("type")
            handler = self.HANDLERS.get(type_) if isinstance(type_, str) else None
            if handler is None:
                raise ChatInputError("unknown_type", f"Unknown frame type {_shown(type_)}.")
            handler = getattr(self, handler)
            await handler(frame)
        except CodedError as exc:  # a frame that cannot be accepted: the client is told why
            await self.send_json({"type": "chat.error", "message": None, "code": exc.code, "detail": exc.detail})

    @staticmethod
    def _decode(text: str | None) -> dict:
        if text is None:
            raise ChatInputError("bad_frame", "Frames are JSON text, not binary.")
        try:
            return json_object(text, what="The frame")
        except BadJson as exc:
            raise ChatInputError("bad_frame", exc.detail) from exc

    async def chat_send(self, frame: dict) -> None:
        model, content = frame.get("model"), frame.get("content")
        conversation, client_id = frame.get("conversation"), frame.get("client_id", "")
        if not isinstance(model, str) or not model:
            raise ChatInputError("bad_frame", "`model` must be a model name.")
        if not isinstance(content, str):
            raise ChatInputError("bad_frame", "`content` must be text.")
        if conversation is not None and (isinstance(conversation, bool) or not isinstance(conversation, int)):
            raise ChatInputError("bad_frame", "`conversation` must be an id or null.")
        if not isinstance(client_id, str) or len(client_id) > CLIENT_ID_MAX or "\x00" in client_id:
            raise ChatInputError("bad_frame", f"`client_id` must be text of at most {CLIENT_ID_MAX} characters.")

        def subscribe(message_id: int) -> None:
            # Runs after the commit, before the task is queued: no frame of
            # the reply can be sent before this socket listens for it.
            self.channel_layer.group_add_blocking(message_group(message_id), self.channel_name)

        reply = await database_sync_to_async(services.message_enqueue)(
            user=self.user, model=model, content=content, conversation_id=conversation, client_id=client_id,
            subscribe=subscribe, knowledge=frame.get("knowledge"),
        )
        await self.send_json({"type": "chat.accepted", "client_id": client_id,
                              "conversation": reply.conversation_id, "message": reply.pk})
        # Before any frame of the worker's: this consumer handles one event
        # at a time, and the group's frames wait for this handler to end.
        queued = queued_frame(reply.pk, reply.admission)
        if queued is not None:
            await self.send_json(queued)

    async def chat_cancel(self, frame: dict) -> None:
        message_id = frame.get("message")
        if isinstance(message_id, bool) or not isinstance(message_id, int):
            raise ChatInputError("bad_frame", "`message` must be a message id.")
        await database_sync_to_async(services.message_cancel)(user=self.user, message_id=message_id)

    async def message_translate(self, frame: dict) -> None:
        """CONTRACT §9: the stored translation at once, or, once it is done,
        `message.translation` through the message's group (joined first)."""
        message_id = frame.get("message")
        if isinstance(message_id, int) and not isinstance(message_id, bool):
            await self.channel_layer.group_add(message_group(message_id), self.channel_name)
        try:
            stored = await database_sync_to_async(translation_request)(
                user=self.user, message_id=message_id, target=frame.get("target"))
        except CodedError as exc:
            await self.send_json({"type": "chat.error", "message": message_id if isinstance(message_id, int)
                                  and not isinstance(message_id, bool) else None,
                                  "code": exc.code, "detail": exc.detail})
            return
        if stored is not None:
            await self.send_json(stored)

    # --- events from the channel layer: each is already a client frame -----

    async def chat_sources(self, event: dict) -> None:
        await self.send_json(event)

    async def message_translation(self, event: dict) -> None:
        await self.send_json(event)

    async def chat_delta(self, event: dict) -> None:
        await self.send_json(event)

    async def gpu_switch(self, event: dict) -> None:
        await self.send_json(event)

    async def chat_done(self, event: dict) -> None:
        await self.send_json(event)
        await self.channel_layer.group_discard(message_group(event["message"]), self.channel_name)

    async def chat_error(self, event: dict) -> None:
        await self.send_json(event)
        if event.get("message") is not None:
            await self.channel_layer.group_discard(message_group(event["message"]), self.channel_name)


def _shown(value, limit: int = 60) -> str:
    """A value from a frame, quoted for an error's detail and cut short."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "…"
