"""The CPU workers' tasks: external generations and batch bookkeeping.

Thin adapters from a queue message to one service call. Every worker
imports this module (settings.CELERY_IMPORTS), and with it the worker
lifecycle (workers/lifecycle.py); nothing here imports torch.
"""
from celery import shared_task

from chat.batches import batch_advance
from chat.catalog import ModelChoice
from chatsite import queues
from workers import lifecycle  # noqa: F401  (connects the worker signals)
from workers.base import MessageTask
from workers.replies import external_reply_generate


@shared_task(name=queues.CPU_GENERATE, base=MessageTask)
def cpu_generate(message_id: int, choice: dict | None = None) -> None:
    """`choice`: the model as the sender resolved it (chat/catalog.py
    `ModelChoice.as_task_kwargs`); absent, the worker resolves it."""
    external_reply_generate(message_id=message_id, choice=ModelChoice(**choice) if choice else None)


@shared_task(name=queues.CPU_BATCH_ADVANCE, ignore_result=True)
def cpu_batch_advance(batch_id: str) -> None:
    batch_advance(batch_id=batch_id)
