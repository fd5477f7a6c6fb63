"""The Celery app: configured from Django settings under the CELERY_ namespace.

Workers (see `chat/management/commands/runstack.py` for the exact lines):

- GPU worker: `-Q gpu -P solo -c 1 --prefetch-multiplier 1`. Solo runs tasks
  in the worker's main process, so the CUDA context and the loaded models
  live in one process for its whole life (prefork would fork after CUDA init,
  which CUDA forbids, and would split models across children); one task at a
  time is exactly one owner of the GPU; prefetch 1 with late ack means the
  worker never sits on a second request it cannot start.
- CPU worker: `-Q cpu -P threads -c 16`. External generations spend their
  time waiting on sockets; threads overlap those waits without forking and
  share one HTTP client per endpoint (a client costs ~17 ms to build).
"""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

app = Celery("chatsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"])
