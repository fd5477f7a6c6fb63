"""Task and queue names: the one place that both the senders (chat/, by
name, so the web process imports no task module) and the workers
(workers/*_tasks.py) read them.

Queues:
- `gpu.<slot>`: one per GPU, consumed by that GPU's one solo worker
  (chat/dispatch.py picks the slot of each message);
- `cpu`: the CPU workers (external generations, batch bookkeeping);
- `knowledge`: the knowledge worker (issue 15): ingestion, a reply's
  retrieval, and translations while the GPU is not the local models'; it
  runs the embedding and translation models on the CPU, with the same
  weights the GPU worker loads.
"""
from __future__ import annotations

CPU_QUEUE = "cpu"
KNOWLEDGE_QUEUE = "knowledge"
GPU_QUEUE_PREFIX = "gpu."


def gpu_queue(slot: str) -> str:
    return f"{GPU_QUEUE_PREFIX}{slot}"


# Task names. They keep the names they had when one module, workers/tasks.py,
# held every task, so that messages queued before an upgrade still find
# their task; settings.CELERY_TASK_ROUTES routes `*.gpu_*` and `*.cpu_*`.
GPU_GENERATE = "workers.tasks.gpu_generate"
GPU_ACQUIRE = "workers.tasks.gpu_acquire"
#: A wake-up for the GPU worker, with no message: the housekeeping queues one
#: when the scheduler holds work and the queue holds no task to serve it.
GPU_SERVE = "workers.tasks.gpu_serve"
GPU_LOAD = "workers.tasks.gpu_load"
GPU_UNLOAD = "workers.tasks.gpu_unload"
GPU_UNLOAD_IDLE = "workers.tasks.gpu_unload_idle"
GPU_TRANSLATE = "workers.tasks.gpu_translate"
GPU_INGEST = "workers.tasks.gpu_ingest"
#: `/v1/embeddings` with a local engine while the GPU is the local models' (chat/embeddings.py).
GPU_EMBED = "workers.tasks.gpu_embed"
CPU_GENERATE = "workers.tasks.cpu_generate"
KNOWLEDGE_INGEST = "workers.knowledge_tasks.knowledge_ingest"
KNOWLEDGE_RETRIEVE = "workers.knowledge_tasks.knowledge_retrieve"
KNOWLEDGE_TRANSLATE = "workers.knowledge_tasks.knowledge_translate"
#: `/v1/embeddings` otherwise: a local engine on the CPU, Ollama, an OpenAI endpoint.
KNOWLEDGE_EMBED = "workers.knowledge_tasks.knowledge_embed"
CPU_BATCH_ADVANCE = "workers.tasks.cpu_batch_advance"

#: The tasks after which a reply may have ended (a batch line moves on).
REPLY_TASKS = frozenset({GPU_GENERATE, GPU_ACQUIRE, GPU_SERVE, CPU_GENERATE})

#: The modules that define the tasks: every worker imports the CPU ones
#: (settings.CELERY_IMPORTS); a GPU worker adds the GPU ones with
#: `-I workers.gpu_tasks` (chat/management/commands/runstack.py), so that
#: only it imports torch.
CPU_TASK_MODULE = "workers.cpu_tasks"
GPU_TASK_MODULE = "workers.gpu_tasks"
KNOWLEDGE_TASK_MODULE = "workers.knowledge_tasks"
