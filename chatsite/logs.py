"""Log lines that trace a reply from socket to worker and back: every record
carries the Celery task id and the message id it belongs to, and with
LOG_FORMAT=json each line is one JSON object (for log shippers)."""
from __future__ import annotations

import contextvars
import json
import logging
import time

#: The reply a piece of code works on; set by the task boundary
#: (workers/base.py MessageTask) for everything a task logs.
message_id_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("message_id", default=None)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from celery import current_task

        request = getattr(current_task, "request", None) if current_task else None
        record.task_id = getattr(request, "id", None)
        record.message_id = message_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "at": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "task_id": getattr(record, "task_id", None),
            "message_id": getattr(record, "message_id", None),
            "process": record.process,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ProbeFilter(logging.Filter):
    """Drops django.request's "Service Unavailable" line for a probe path.

    Django logs every 5xx answer at ERROR (django.utils.log.log_response).
    A readiness probe's 503 is an answer, not a failure of the server: a
    load balancer polling /readyz every few seconds while the workers start
    would log an ERROR each time. The probe's view logs the changes of its
    state instead, once each."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__()
        self.paths = frozenset(paths)

    def filter(self, record: logging.LogRecord) -> bool:
        request = getattr(record, "request", None)
        return not (getattr(record, "status_code", None) == 503 and getattr(request, "path", None) in self.paths)
