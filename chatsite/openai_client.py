"""Everything this project asks of an OpenAI-compatible endpoint, through the
official `openai` client. Clients are built once per process and endpoint."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import httpx
import openai
from django.conf import settings

from chatsite.errors import CodedError


class OpenAIEndpointError(CodedError):
    code = "upstream_error"


class OpenAIUnavailable(OpenAIEndpointError):
    code = "endpoint_unavailable"


class OpenAIAuthFailed(OpenAIEndpointError):
    code = "upstream_auth"


class OpenAIRateLimited(OpenAIEndpointError):
    code = "upstream_rate_limited"


@dataclass(frozen=True)
class ChatChunk:
    text: str
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: On the chunk with the finish reason: the tool calls, whole (OpenAI's form).
    tool_calls: list[dict] | None = None


@functools.lru_cache(maxsize=32)
def openai_client(base_url: str, api_key: str) -> openai.OpenAI:
    timeout = httpx.Timeout(settings.UPSTREAM_READ_TIMEOUT, connect=settings.UPSTREAM_CONNECT_TIMEOUT)
    # Retries would hide a down endpoint behind seconds of back-off; the
    # message fails clearly instead and the user can resend.
    return openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=0)


@contextlib.contextmanager
def _translated(base_url: str, api_key: str) -> Iterator[None]:
    """The client's errors as ours. Raised `from None`: Celery logs a failed
    task's whole exception chain, and an upstream's error body may quote the
    key it was sent, so neither the original exception nor its text (unless
    scrubbed of the key) goes further."""
    try:
        yield
    except openai.AuthenticationError:
        raise OpenAIAuthFailed(f"{base_url} refused the API key (401)") from None
    except openai.RateLimitError:
        raise OpenAIRateLimited(f"{base_url} is rate limiting requests (429)") from None
    except (openai.APIConnectionError, httpx.TransportError) as exc:
        raise OpenAIUnavailable(f"{base_url} does not answer: {_scrubbed(str(exc), api_key)}") from None
    except openai.APIStatusError as exc:
        raise OpenAIEndpointError(
            f"{base_url} answered {exc.status_code}: {_scrubbed(exc.message, api_key)}") from None


def _scrubbed(text: str, api_key: str) -> str:
    return text.replace(api_key, "[key]") if api_key else text


def openai_models(base_url: str, api_key: str) -> list[str]:
    """Ids of the models the endpoint offers (`GET /v1/models`)."""
    with _translated(base_url, api_key):
        return [m.id for m in openai_client(base_url, api_key).models.list()]


def openai_chat_stream(
    base_url: str, api_key: str, *, model: str, messages: list[dict], arguments: dict,
) -> Iterator[ChatChunk]:
    """Stream a chat completion (SSE). Closing the generator closes the
    response, which is how a cancel stops the upstream's work. `arguments`:
    the request's other parameters, passed through as the body's own
    (`extra_body`: the client then sends them whatever their name, as a
    compatible server may know more than the client's typed signature).
    Tool calls stream as fragments keyed by index; they are put together
    and handed over whole with the finish reason."""
    with _translated(base_url, api_key):
        stream = openai_client(base_url, api_key).chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True},
            extra_body=arguments,
        )
        calls: dict[int, dict] = {}
        with stream:
            for chunk in stream:
                choice = chunk.choices[0] if chunk.choices else None
                delta = choice.delta if choice else None
                for part in (delta.tool_calls or ()) if delta else ():
                    call = calls.setdefault(part.index, {"id": "", "type": "function",
                                                         "function": {"name": "", "arguments": ""}})
                    call["id"] = part.id or call["id"]
                    if part.function:
                        call["function"]["name"] += part.function.name or ""
                        call["function"]["arguments"] += part.function.arguments or ""
                finish = (choice.finish_reason or "") if choice else ""
                usage = chunk.usage
                yield ChatChunk(
                    text=(delta.content or "") if delta else "",
                    finish_reason=finish,
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    completion_tokens=usage.completion_tokens if usage else 0,
                    tool_calls=[calls[i] for i in sorted(calls)] if finish and calls else None,
                )


# --- embeddings (issue 16) ------------------------------------------------------

class OpenAIRefused(OpenAIEndpointError):
    """The endpoint refused the request itself, not the key: 400 (a bad
    parameter, a dimension the model cannot give) or 403 (OpenAI's answer
    to a chat model asked for embeddings: "You are not allowed to generate
    embeddings from this model"). The caller gets a 400 naming `param`,
    not a 502."""

    code = "invalid_request"

    def __init__(self, detail: str, *, param: str | None = None):
        super().__init__(detail)
        self.param = param


@dataclass(frozen=True)
class OpenAIEmbeddings:
    #: One per input, in order: a list of floats, or with encoding_format
    #: "base64" the endpoint's base64 string of little-endian float32.
    vectors: list
    prompt_tokens: int
    total_tokens: int


def openai_embeddings(base_url: str, api_key: str, *, model: str, inputs: list, encoding_format: str,
                      dimensions: int | None = None, user: str | None = None) -> OpenAIEmbeddings:
    """`POST /v1/embeddings`, the caller's parameters passed as given.
    `encoding_format` is always sent: left out, the client would ask for
    base64 and decode it itself, and the endpoint would not see what the
    caller asked for."""
    optional = {k: v for k, v in (("dimensions", dimensions), ("user", user)) if v is not None}
    with _translated(base_url, api_key):
        try:
            answer = openai_client(base_url, api_key).embeddings.create(
                model=model, input=inputs, encoding_format=encoding_format, **optional)
        except (openai.BadRequestError, openai.PermissionDeniedError) as exc:
            # Not through _translated's 502: OpenAIRefused is no openai error, so it passes it by.
            param = "model" if isinstance(exc, openai.PermissionDeniedError) else exc.param
            raise OpenAIRefused(f"{base_url} refused {model}: {_scrubbed(exc.message, api_key)}",
                                param=param) from None
    rows = sorted(answer.data, key=lambda d: d.index)
    usage = answer.usage
    return OpenAIEmbeddings(vectors=[d.embedding for d in rows], prompt_tokens=usage.prompt_tokens if usage else 0,
                            total_tokens=usage.total_tokens if usage else 0)
