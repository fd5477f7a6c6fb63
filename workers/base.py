"""The base of every task whose first argument is a reply's message id:
what such a task does at its boundary, whichever worker runs it."""
from __future__ import annotations

from celery import Task

from chat.dispatch import message_fail
from chatsite.errors import error_code
from chatsite.logs import message_id_var


class MessageTask(Task):
    """A task whose first argument is a reply's message id.

    Any exception that escapes the task ends the reply with `chat.error`
    (once; a reply already ended is left alone), so that every accepted
    message ends in `chat.done` or `chat.error`. A failed acquire step also
    stops its chain, so the streaming step never runs.
    """

    abstract = True
    #: Results are not read: replies travel through the channel layer.
    ignore_result = True

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception:
            raise  # on_failure ends the reply
        except BaseException as exc:
            # The gevent pool (CPU workers) enforces the hard time limit by
            # raising gevent's Timeout, a BaseException, inside the task;
            # Celery then fails the task without calling on_failure, so the
            # reply is ended here. Our own deadline (GENERATION_DEADLINE_SECONDS)
            # ends a reply long before; this is the backstop.
            if _time_limit(exc):
                message_id = self.message_id(args, kwargs)
                if message_id is not None:
                    message_fail(message_id=message_id, code="time_limit",
                                 detail=f"The reply ran past the {exc.seconds:g} s time limit of its task.")
            raise

    def before_start(self, task_id, args, kwargs) -> None:
        # Everything this task logs names its message (chatsite/logs.py).
        message_id_var.set(args[0] if args else kwargs.get("message_id"))

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:
        message_id_var.set(None)

    def message_id(self, args, kwargs) -> int | None:
        """The reply this run works on: its first argument, unless the run
        named another on its request (a GPU task serves the scheduler's
        pick, workers/gpu_tasks.py)."""
        picked = getattr(self.request, "message_id", None)
        if picked is not None:
            return picked
        return args[0] if args else kwargs.get("message_id")

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        message_id = self.message_id(args, kwargs)
        if message_id is not None:
            message_fail(message_id=message_id, code=error_code(exc), detail=str(exc) or type(exc).__name__)


def _time_limit(exc: BaseException) -> bool:
    """gevent's Timeout, as the gevent pool raises it at a task's time limit
    (celery/concurrency/gevent.py `apply_timeout`); gevent is not imported
    by the other pools' processes."""
    cls = type(exc)
    return cls.__name__ == "Timeout" and cls.__module__.startswith("gevent")
