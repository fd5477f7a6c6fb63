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
    base_url: str, api_key: str, *, model: str, messages: list[dict], max_tokens: int,
    temperature: float, top_p: float,
) -> Iterator[ChatChunk]:
    """Stream a chat completion (SSE). Closing the generator closes the
    response, which is how a cancel stops the upstream's work."""
    with _translated(base_url, api_key):
        stream = openai_client(base_url, api_key).chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, stream=True, stream_options={"include_usage": True},
        )
        with stream:
            for chunk in stream:
                choice = chunk.choices[0] if chunk.choices else None
                usage = chunk.usage
                yield ChatChunk(
                    text=(choice.delta.content or "") if choice and choice.delta else "",
                    finish_reason=(choice.finish_reason or "") if choice else "",
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    completion_tokens=usage.completion_tokens if usage else 0,
                )
