"""Everything this project asks of an Ollama server, through the official
`ollama` client (HTTP API: https://github.com/ollama/ollama/blob/main/docs/api.md).

Clients are built once per process and base URL: building one costs ~17 ms
(an httpx client), more than the whole first-token latency we aim for.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import httpx
import ollama
from django.conf import settings

from chatsite.errors import CodedError


class OllamaError(CodedError):
    code = "ollama_error"


class OllamaUnavailable(OllamaError):
    code = "endpoint_unavailable"


class OllamaModelMissing(OllamaError):
    code = "model_not_found"


class OllamaUnloadTimeout(OllamaError):
    code = "unload_timeout"


@dataclass(frozen=True)
class LoadedModel:
    name: str
    size_vram: int


@dataclass(frozen=True)
class UnloadResult:
    models: list[str]
    size_vram_freed: int
    seconds: float


@dataclass(frozen=True)
class ChatChunk:
    text: str
    done: bool = False
    done_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: The final chunk's `load_duration`: seconds Ollama spent loading the model.
    load_seconds: float = 0.0
    #: Tool calls in this chunk, as {"name", "arguments" (an object)}.
    tool_calls: tuple[dict, ...] = ()


@functools.lru_cache(maxsize=32)
def ollama_client(base_url: str) -> ollama.Client:
    timeout = httpx.Timeout(settings.UPSTREAM_READ_TIMEOUT, connect=settings.UPSTREAM_CONNECT_TIMEOUT)
    # One connection per stream, as many as the CPU worker streams at once
    # (httpx's default of 100 would queue the rest for a free connection).
    limits = httpx.Limits(max_connections=settings.CPU_WORKER_CONCURRENCY, max_keepalive_connections=100)
    return ollama.Client(host=base_url, timeout=timeout, limits=limits)


@contextlib.contextmanager
def _translated(base_url: str) -> Iterator[None]:
    """Turn the client's transport and HTTP errors into this module's."""
    try:
        yield
    except (httpx.TransportError, ConnectionError) as exc:
        raise OllamaUnavailable(f"Ollama at {base_url} does not answer: {exc}") from exc
    except ollama.ResponseError as exc:
        if exc.status_code == 404:
            raise OllamaModelMissing(f"Ollama at {base_url}: {exc.error}") from exc
        raise OllamaError(f"Ollama at {base_url} answered {exc.status_code}: {exc.error}") from exc


def _call(base_url: str, fn: Callable):
    with _translated(base_url):
        return fn(ollama_client(base_url))


def ollama_tags(base_url: str) -> list[str]:
    """Tags of the models the server has pulled (`GET /api/tags`)."""
    listed = _call(base_url, lambda c: c.list())
    return [m.model for m in listed.models if m.model]


def ollama_ps(base_url: str) -> list[LoadedModel]:
    """Models the server holds in memory now (`GET /api/ps`)."""
    running = _call(base_url, lambda c: c.ps())
    return [LoadedModel(name=m.model or m.name, size_vram=m.size_vram or 0) for m in running.models]


def ollama_unload_all(base_url: str, *, timeout: float, poll: float) -> UnloadResult:
    """Unload every model `/api/ps` lists and wait until it lists none.

    Ollama has no unload-all, and it answers `keep_alive: 0` before the memory
    is free, so the only proof is `/api/ps` coming back empty (docs/api.md in
    https://github.com/ollama/ollama, "Unload a model" and "List running models").
    """
    started = time.monotonic()
    loaded = ollama_ps(base_url)
    for model in loaded:
        _call(base_url, lambda c, name=model.name: c.generate(model=name, keep_alive=0))
    deadline = started + timeout
    remaining = loaded
    while remaining:
        if time.monotonic() > deadline:
            names = ", ".join(m.name for m in remaining)
            raise OllamaUnloadTimeout(f"Ollama at {base_url} still lists {names} after {timeout:.0f} s")
        time.sleep(poll)
        remaining = ollama_ps(base_url)
    return UnloadResult(
        models=[m.name for m in loaded],
        size_vram_freed=sum(m.size_vram for m in loaded),
        seconds=time.monotonic() - started,
    )


def ollama_chat_stream(
    base_url: str, *, model: str, messages: list[dict], options: dict, tools: list[dict] | None = None,
    format: str | dict | None = None,
) -> Iterator[ChatChunk]:
    """Stream a chat reply (`POST /api/chat`, NDJSON). Closing the generator
    closes the HTTP response, which is how a cancel stops Ollama's work.
    `tools` and `format` (JSON mode, or a JSON schema) as docs/api.md gives
    them; a message's `images` must be bytes (chat/params.py says why)."""
    # The client's stream is a generator: errors surface while iterating.
    stream = _call(base_url, lambda c: c.chat(model=model, messages=messages, options=options, tools=tools,
                                               format=format, stream=True))
    try:
        with _translated(base_url):
            for part in stream:
                calls = tuple({"name": c.function.name, "arguments": dict(c.function.arguments or {})}
                              for c in part.message.tool_calls or ())
                if part.done:
                    yield ChatChunk(
                        text=part.message.content or "",
                        done=True,
                        done_reason=part.done_reason or "stop",
                        prompt_tokens=part.prompt_eval_count or 0,
                        completion_tokens=part.eval_count or 0,
                        load_seconds=(part.load_duration or 0) / 1e9,
                        tool_calls=calls,
                    )
                    # Read the body to its end: a response closed before
                    # it cannot go back to the pool, and the next reply
                    # would open a new connection (a thread-pool name lookup
                    # and a TCP handshake: ~6 % of a CPU worker's time).
                    for _ in stream:
                        pass
                    return
                yield ChatChunk(text=part.message.content or "", tool_calls=calls)
    finally:
        stream.close()
    raise OllamaUnavailable(f"Ollama at {base_url} ended the stream without its final chunk")


# --- embeddings (issue 16) ------------------------------------------------------

@dataclass(frozen=True)
class OllamaEmbeddings:
    vectors: list[list[float]]
    #: Ollama's `prompt_eval_count`: the tokens of every input together.
    prompt_tokens: int


class OllamaRefused(OllamaError):
    """Ollama will not serve a request it understood: 501 for a model that
    does not embed (its runner has no pooling: server/routes.go EmbedHandler
    in https://github.com/ollama/ollama), 400 for a bad parameter. The
    caller's request is at fault, not the server; `param` names what."""

    code = "invalid_request"

    def __init__(self, detail: str, *, param: str | None = None):
        super().__init__(detail)
        self.param = param


def ollama_embed(base_url: str, *, model: str, inputs: list[str], dimensions: int | None = None,
                 options: dict | None = None, keep_alive: float | str | None = None) -> OllamaEmbeddings:
    """Vectors for `inputs` (`POST /api/embed`), one per input, in order.
    `options` are Ollama's model options (`{"num_gpu": 0}`: on the CPU);
    `keep_alive`: how long Ollama keeps the model loaded afterwards."""
    try:
        answer = _call(base_url, lambda c: c.embed(model=model, input=inputs, dimensions=dimensions,
                                                   options=options, keep_alive=keep_alive))
    except OllamaError as exc:
        cause = exc.__cause__
        if isinstance(cause, ollama.ResponseError) and cause.status_code in (400, 501):
            raise OllamaRefused(f"Ollama at {base_url} refused {model}: {cause.error}",
                                param="model" if cause.status_code == 501 else None) from cause
        raise
    return OllamaEmbeddings(vectors=[list(v) for v in answer.embeddings], prompt_tokens=answer.prompt_eval_count or 0)
