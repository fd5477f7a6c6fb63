"""What a user does to their own conversations from the chat page: rename,
delete, and take back the last exchange so that it can be asked again
(Regenerate). Sending goes through `chat.services.message_enqueue`, over the
websocket, so that the socket is subscribed to the new reply.

A request that cannot be done raises `ChatInputError` and changes nothing."""
from __future__ import annotations

from django.db import transaction

from chat import services
from chat.models import FINISHED_STATUSES, Conversation, Message
from chat.services import ChatInputError

TITLE_MAX = Conversation._meta.get_field("title").max_length


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    title = " ".join(str(title).split())  # one line: it is shown in a one-line list
    if not title:
        raise ChatInputError("empty_title", "The title is empty.")
    if "\x00" in title:
        raise ChatInputError("bad_title", "The title contains a NUL character (\\u0000).")
    conversation.title = title[:TITLE_MAX]
    # `updated_at` is left alone: the list is ordered by use, and renaming is not use.
    Conversation.objects.filter(pk=conversation.pk).update(title=conversation.title)
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete a conversation and its messages. Replies still queued or
    streaming are cancelled first, so that no worker keeps generating text
    nobody can see."""
    for message_id in conversation.messages.filter(role=Message.Role.ASSISTANT).exclude(
            status__in=FINISHED_STATUSES).values_list("pk", flat=True):
        try:
            services.message_cancel(user=conversation.user, message_id=message_id)
        except ChatInputError:
            pass  # it finished meanwhile: nothing left to stop
    conversation.delete()


def exchange_retract(*, reply: Message) -> dict:
    """Remove the conversation's last reply and the question before it, and
    return that question, which the page sends again (Regenerate). Only the
    last reply, once finished: an earlier one is part of the history that
    later replies were written from."""
    if reply.role != Message.Role.ASSISTANT:
        raise ChatInputError("not_a_reply", "Only a reply can be regenerated.")
    if not reply.is_finished:
        raise ChatInputError("not_finished", "The reply is still being written.")
    with transaction.atomic():
        last_two = list(reply.conversation.messages.select_for_update().order_by("-pk")[:2])
        if not last_two or last_two[0].pk != reply.pk:
            raise ChatInputError("not_last", "Only the last reply can be regenerated.")
        question = last_two[1] if len(last_two) == 2 and last_two[1].role == Message.Role.USER else None
        if question is None:
            raise ChatInputError("no_question", "This reply has no question before it.")
        Message.objects.filter(pk__in=[reply.pk, question.pk]).delete()
    return {"content": question.content, "model": reply.model_name}
