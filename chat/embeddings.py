"""`/v1/embeddings` (issue 16), for the view and for batch lines alike:
check a request, find its backend, queue it where that backend may run,
run it there, and hand the vectors back.

Where each backend runs (docs/gpu-arbitration.md, "Embeddings"):
- a local embedding engine (admin kind "embedding") as the knowledge work
  does (docs/knowledge.md): on the GPU worker, in line with its messages,
  while the GPU is the local models' (`gpu_embed`), otherwise on the
  knowledge worker's CPU copy (`knowledge_embed`), so that an embedding
  never takes the GPU from Ollama;
- Ollama (`ollama_<tag>`): from the knowledge worker; on the GPU under a
  lease while Ollama holds the GPU, else on Ollama's CPU (`num_gpu: 0`),
  so that it takes no GPU memory from the local models;
- an OpenAI-compatible endpoint (`openai_<id>`): from the knowledge worker,
  the caller's parameters passed as given.

The answer travels back as in a chat reply's way, on the channel layer: the
view subscribes a channel of its own to a group named for the request, and
the worker sends one `embeddings.result` (the vectors as raw little-endian
float32, compact under msgpack) or `embeddings.error` there. A batch line's
answer is written on its BatchLine instead (chat/batches.py). Celery has
no result backend here (chatsite/settings.py): nothing else could carry it.

The OpenAI API has no query/passage notion, so an input is embedded as
given, with no prefix: a client that follows an e5 model card adds
"query: " itself, and would otherwise get it twice. `input_type` ("query" or
"passage", an extra body field: `extra_body` in the openai client) asks for
the prefixes configured on the model in the admin, which makes the vectors
those of the knowledge bases (passage) and of their questions (query).
"""
from __future__ import annotations

import array
import base64
import logging
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable

from django.conf import settings

from chat.catalog import CatalogError, ModelChoice, PREFIXES, model_resolve
from chat.completions import RequestError
from chat.models import LOCAL_KINDS, ModelConfig, ModelKind
from chat.ratelimit import RateLimited, message_rate_check
from chat.relay import group_send
from chatsite import queues
from chatsite.celery import app
from chatsite.errors import CodedError, error_code
from chatsite.ollama_client import ollama_embed
from chatsite.openai_client import openai_embeddings
from gpu_manager.leases import LeaseKeeper, Leases
from gpu_manager.scheduler import slot_scheduler
from gpu_manager.state import gpu_local_now

log = logging.getLogger(__name__)

PARAMETERS = frozenset({"model", "input", "encoding_format", "dimensions", "user", "input_type"})
ENCODINGS = ("float", "base64")
INPUT_TYPES = ("query", "passage")
RESULT_TYPE, ERROR_TYPE = "embeddings.result", "embeddings.error"


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    #: Strings, or (`tokens`) lists of token ids.
    inputs: list
    tokens: bool = False
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    input_type: str | None = None

    @property
    def backend(self) -> str:
        """"ollama", "openai" or "local", from the model's name (CONTRACT §3)."""
        for kind, prefix in PREFIXES.items():
            if self.model.startswith(prefix):
                return kind
        return "local"


@dataclass(frozen=True)
class Vectors:
    """What a backend gave: `count` rows of `dimension` float32 values in
    `data` (little-endian, row after row), and where it ran."""

    data: bytes
    count: int
    dimension: int
    prompt_tokens: int
    total_tokens: int
    embedded_by: str

    def rows(self, encoding_format: str) -> list:
        width = self.dimension * 4
        if encoding_format == "base64":
            return [base64.b64encode(self.data[i * width:(i + 1) * width]).decode() for i in range(self.count)]
        values = array.array("f", self.data)
        if sys.byteorder == "big":
            values.byteswap()
        return [values[i * self.dimension:(i + 1) * self.dimension].tolist() for i in range(self.count)]


# --- the request ------------------------------------------------------------------

def _bad(detail: str, param: str) -> RequestError:
    return RequestError("invalid_request", detail, param=param)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def embedding_request_parse(body) -> EmbeddingRequest:
    """Check a `/v1/embeddings` body as OpenAI does; RequestError (400)
    names the parameter at fault."""
    if not isinstance(body, dict):
        raise RequestError("invalid_request", "The body must be a JSON object.")
    for name in body:
        if name not in PARAMETERS:
            raise _bad(f"Unrecognized request argument supplied: {name}", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", "model")
    inputs, tokens = _inputs(body.get("input"))
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODINGS:
        raise _bad(f"encoding_format must be one of {list(ENCODINGS)}, not {encoding_format!r}.", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and not (_is_int(dimensions) and dimensions > 0):
        raise _bad("dimensions must be a positive integer.", "dimensions")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user must be a string.", "user")
    input_type = body.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise _bad(f"input_type must be one of {list(INPUT_TYPES)}.", "input_type")
    return EmbeddingRequest(model=model, inputs=inputs, tokens=tokens, encoding_format=encoding_format,
                            dimensions=dimensions, user=user, input_type=input_type)


def _inputs(value) -> tuple[list, bool]:
    """`input` as a list, and whether it is token ids: a string, a list of
    strings, a list of token ids (one input), or a list of such lists."""
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, list) and value and all(_is_int(v) for v in value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _bad("input must be a non-empty string, a list of strings, or token ids.", "input")
    if len(value) > settings.EMBEDDINGS_MAX_INPUTS:
        raise _bad(f"input holds {len(value)} items; at most {settings.EMBEDDINGS_MAX_INPUTS} are allowed.", "input")
    if all(isinstance(v, str) for v in value):
        for index, text in enumerate(value):
            if not text:
                raise _bad(f"input[{index}] is empty: an embedding needs some text.", "input")
            if len(text) > settings.EMBEDDINGS_MAX_INPUT_CHARS:
                raise _bad(f"input[{index}] is longer than {settings.EMBEDDINGS_MAX_INPUT_CHARS} characters.",
                           "input")
            if "\x00" in text:  # as the chat's content: PostgreSQL stores no NUL (a batch line's body)
                raise _bad(f"input[{index}] contains a NUL character (\\u0000).", "input")
        _size_check(sum(len(text) for text in value) / 4)
        return value, False
    if all(isinstance(v, list) and v and all(_is_int(t) and t >= 0 for t in v) for v in value):
        _size_check(sum(len(ids) for ids in value))
        return value, True
    raise _bad("input must be a non-empty string, a list of strings, or token ids (non-empty lists of "
               "non-negative integers), not a mix.", "input")


def _size_check(tokens: float) -> None:
    if tokens > settings.EMBEDDINGS_MAX_REQUEST_TOKENS:
        raise _bad(f"input is too large: at most {settings.EMBEDDINGS_MAX_REQUEST_TOKENS} tokens a request (text "
                   "counts 4 characters a token), all inputs together.", "input")


def embedding_backend(*, request: EmbeddingRequest) -> ModelChoice | None:
    """The request's model: the endpoint's ModelChoice for Ollama and
    OpenAI models, None for a local embedding engine. RequestError: an
    unknown model (404), a model that does not embed, or an input this
    backend cannot take (400)."""
    if request.backend == "local":
        config = ModelConfig.objects.filter(kind__in=LOCAL_KINDS, name=request.model).first()
        if config is None or not config.enabled:
            raise RequestError("model_not_found", f"The model '{request.model}' does not exist", param="model")
        if config.kind != ModelKind.EMBEDDING:
            raise _bad(f"The model '{request.model}' is a {config.get_kind_display().lower()}, not an embedding "
                       "model: pick one of kind “embedding” (GET /v1/models).", "model")
        choice = None
    else:
        try:
            choice = model_resolve(request.model)
        except CatalogError as exc:
            code = "model_not_found" if exc.code in ("unknown_model", "model_disabled") else exc.code
            raise RequestError(code, str(exc), param="model") from exc
    if request.tokens and request.backend != ModelKind.OPENAI:
        raise _bad("Token ids are taken only by OpenAI-compatible endpoints' models: send the text.", "input")
    if request.input_type is not None and request.backend != "local":
        raise _bad("input_type (the model's query or passage prefix) applies to local embedding models only.",
                   "input_type")
    return choice


def embedding_models() -> list[str]:
    """The enabled local embedding engines, for /v1/models (not for the chat
    page's picker, nor for chat completions: they do not chat)."""
    return list(ModelConfig.objects.filter(kind=ModelKind.EMBEDDING, enabled=True)
                .order_by("name").values_list("name", flat=True))


def embedding_group() -> str:
    """A group for one request's answer (channel-layer group names: ASCII
    letters, digits, hyphens, periods; under 100 characters)."""
    return f"emb.{uuid.uuid4().hex}"


def embedding_submit(*, user, request: EmbeddingRequest, reply_to: dict) -> None:
    """An interactive request (the view): its model checked, the user's
    rate limit (one request counts as a chat message does), then queued.
    `reply_to`: {"group": NAME}, where the view listens."""
    try:
        message_rate_check(user=user)
    except RateLimited as exc:
        raise RequestError("rate_limited", str(exc)) from exc
    embedding_queue(request=request, choice=embedding_backend(request=request), reply_to=reply_to)


def embedding_queue(*, request: EmbeddingRequest, choice: ModelChoice | None, reply_to: dict,
                    priority: int | None = None) -> None:
    """Queue a checked request where its backend runs (module docstring).
    `choice`: `embedding_backend`'s answer; `reply_to`: {"group": NAME} or
    {"line": ID} (a batch line, chat/batches.py)."""
    args = (asdict(request), reply_to)
    if request.backend == "local" and gpu_local_now(settings.GPU_SLOT):
        _send(queues.GPU_EMBED, queues.gpu_queue(settings.GPU_SLOT), args, priority=priority)
    else:
        kwargs = {"choice": choice.as_task_kwargs()} if choice is not None else {}
        _send(queues.KNOWLEDGE_EMBED, queues.KNOWLEDGE_QUEUE, args, kwargs, priority=priority)


def embedding_queue_cpu(*, request: dict, reply_to: dict, priority: int | None = None) -> None:
    """A local request the GPU worker hands on: the GPU changed hands since
    it was queued (`gpu_embed`)."""
    _send(queues.KNOWLEDGE_EMBED, queues.KNOWLEDGE_QUEUE, (request, reply_to), priority=priority)


def _send(task: str, queue: str, args: tuple, kwargs: dict | None = None, *, priority: int | None) -> None:
    # A batch line's priority (settings.BATCH_PRIORITY) puts it behind every interactive request.
    options = {"priority": priority} if priority is not None else {}
    app.signature(task, args=args, kwargs=kwargs or {}, queue=queue, **options).apply_async()


# --- running it (in a worker) ---------------------------------------------------------

def embedding_run(*, request: dict, reply_to: dict, load: Callable[[str], object] | None = None,
                  by: str = "", choice: dict | None = None) -> None:
    """Run the request and send its answer to `reply_to`, whatever happens:
    the vectors, or the error in OpenAI's terms. `load(name)`: the local
    engine, loaded (GPU worker or knowledge worker; `by` says which);
    `choice`: the remote model as the sender resolved it."""
    parsed = EmbeddingRequest(**request)
    try:
        if parsed.backend == "local":
            vectors = _local_run(parsed, load(parsed.model), by)
        else:
            remote = ModelChoice(**choice) if choice else model_resolve(parsed.model)
            vectors = _ollama_run(parsed, remote) if parsed.backend == ModelKind.OLLAMA else _openai_run(parsed, remote)
    except Exception as exc:
        if not isinstance(exc, CodedError):
            log.exception("embeddings for %s failed", parsed.model)
        _deliver_error(reply_to, code=error_code(exc) if isinstance(exc, CodedError) else "embedding_failed",
                       detail=str(exc) or type(exc).__name__, param=getattr(exc, "param", None))
        return
    _deliver(parsed, reply_to, vectors)


def _local_run(request: EmbeddingRequest, engine, by: str) -> Vectors:
    """On a loaded EmbeddingEngine (gpu_manager/engines.py)."""
    if request.dimensions is not None and request.dimensions != engine.dimension:
        # Truncating and renormalising is right only for a model trained for
        # it (Matryoshka: text-embedding-3, nomic-embed v1.5); e5 and the
        # demo embedder were not, and a shorter vector of theirs would
        # quietly rank worse.
        raise RequestError("invalid_request", f"{request.model} gives vectors of {engine.dimension} dimensions "
                           "only; it was not trained to be cut shorter.", param="dimensions")
    kind = request.input_type  # None: the text as given, no prefix
    prefix = engine.prefixes[kind] if kind else ""
    rows = engine.embed(request.inputs, kind=kind)
    tokens = sum(engine.token_count(prefix + text) for text in request.inputs)
    return Vectors(data=rows.astype("<f4", copy=False).tobytes(), count=rows.shape[0], dimension=rows.shape[1],
                   prompt_tokens=tokens, total_tokens=tokens, embedded_by=by)


def _ollama_run(request: EmbeddingRequest, choice: ModelChoice) -> Vectors:
    """On Ollama's GPU under a lease while Ollama holds it; on Ollama's CPU
    otherwise (docs/gpu-arbitration.md, "Embeddings")."""
    slot = settings.OLLAMA_GPU_SLOT
    leases = Leases(slot=slot)
    # A lease's holder is read back as a reply's id when it expires (its
    # holder died: workers/lifecycle.py replies_fail_lost fails that reply).
    # A negative number names no reply, so that failure finds nothing to end.
    holder = -random.randrange(1, 2 ** 62)
    if slot_scheduler(slot).lease_if_ollama(holder, ttl=settings.GPU_LEASE_TTL):
        with LeaseKeeper(leases, holder, ttl=settings.GPU_LEASE_TTL):
            found = ollama_embed(choice.base_url, model=choice.upstream, inputs=request.inputs,
                                 dimensions=request.dimensions)
        by = f"ollama on the GPU (slot {slot})"
    else:
        # num_gpu 0: Ollama starts a CPU-only runner ("If the user wants zero
        # GPU layers, reset the gpu list to be CPU/system ram info", llm/server.go
        # in https://github.com/ollama/ollama), so nothing lands on the local
        # models' GPU.
        found = ollama_embed(choice.base_url, model=choice.upstream, inputs=request.inputs,
                             dimensions=request.dimensions, options={"num_gpu": 0},
                             keep_alive=settings.OLLAMA_EMBED_CPU_KEEP_ALIVE)
        by = "ollama on the CPU (num_gpu 0)"
    return _from_floats(found.vectors, prompt_tokens=found.prompt_tokens, total_tokens=found.prompt_tokens, by=by)


def _openai_run(request: EmbeddingRequest, choice: ModelChoice) -> Vectors:
    found = openai_embeddings(choice.base_url, choice.api_key, model=choice.upstream, inputs=request.inputs,
                              encoding_format=request.encoding_format, dimensions=request.dimensions,
                              user=request.user)
    rows = [_b64_floats(v) if isinstance(v, str) else v for v in found.vectors]
    return _from_floats(rows, prompt_tokens=found.prompt_tokens, total_tokens=found.total_tokens,
                        by=f"openai endpoint {choice.base_url}")


def _b64_floats(text: str) -> array.array:
    values = array.array("f", base64.b64decode(text))
    if sys.byteorder == "big":
        values.byteswap()
    return values


def _from_floats(rows: list, *, prompt_tokens: int, total_tokens: int, by: str) -> Vectors:
    dimension = len(rows[0]) if rows else 0
    if any(len(row) != dimension for row in rows):
        raise RequestError("upstream_error", "The backend answered vectors of different lengths.")
    values = array.array("f")
    for row in rows:
        values.extend(row)
    if sys.byteorder == "big":
        values.byteswap()
    return Vectors(data=values.tobytes(), count=len(rows), dimension=dimension, prompt_tokens=prompt_tokens,
                   total_tokens=total_tokens, embedded_by=by)


# --- the answer -----------------------------------------------------------------

def embedding_body(request: EmbeddingRequest, vectors: Vectors) -> dict:
    """OpenAI's embeddings response; `embedded_by` (ours, which clients
    ignore) says where the vectors were made."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row}
                 for i, row in enumerate(vectors.rows(request.encoding_format))],
        "model": request.model,
        "usage": {"prompt_tokens": vectors.prompt_tokens, "total_tokens": vectors.total_tokens},
        "embedded_by": vectors.embedded_by,
    }


def embedding_answer(event: dict) -> Vectors:
    """The view's side of `_deliver`: the vectors of a result event, or the
    RequestError of an error event."""
    if event.get("type") == ERROR_TYPE:
        raise RequestError(event.get("code") or "embedding_failed", event.get("detail") or "The embedding failed.",
                           param=event.get("param"))
    return Vectors(**{k: event[k] for k in ("data", "count", "dimension", "prompt_tokens", "total_tokens",
                                            "embedded_by")})


def _deliver(request: EmbeddingRequest, reply_to: dict, vectors: Vectors) -> None:
    if "line" in reply_to:
        _line_deliver(reply_to["line"], {"status_code": 200, "body": embedding_body(request, vectors)})
    else:
        group_send(reply_to["group"], {"type": RESULT_TYPE, **asdict(vectors)})


def _deliver_error(reply_to: dict, *, code: str, detail: str, param: str | None) -> None:
    if "line" in reply_to:
        error = RequestError(code, detail, param=param)
        _line_deliver(reply_to["line"], {"status_code": error.status, "body": error.body()})
    else:
        group_send(reply_to["group"], {"type": ERROR_TYPE, "code": code, "detail": detail, "param": param})


def _line_deliver(line_id: int, response: dict) -> None:
    # Imported here: chat.batches imports this module to check and queue its lines.
    from chat.batches import batch_line_answered

    batch_line_answered(line_id=line_id, response=response)
