"""FakeOpenAI: a loopback HTTP server speaking OpenAI's REST API.

Reproduces what the service uses of the real API closely enough that the
official ``openai`` client works unchanged
(``openai.OpenAI(base_url=fake.url + "/v1", api_key=fake.api_key)``):

* Bearer authentication on every endpoint: a missing or wrong key gets 401
  with OpenAI's error envelope ``{"error": {"message", "type", "param",
  "code": "invalid_api_key"}}`` (the client raises ``AuthenticationError``).
  ``api_key=None`` turns the check off.
* ``GET /v1/models``, ``GET /v1/models/{id}``.
* ``POST /v1/chat/completions``: a ``chat.completion`` object, or with
  ``"stream": true`` Server-Sent Events over a chunked body: a role chunk,
  one ``chat.completion.chunk`` per whitespace-separated token of ``reply``
  (spaces kept, so the contents concatenate to ``reply``), a chunk carrying
  ``finish_reason``, a ``usage`` chunk with ``choices: []`` when
  ``stream_options.include_usage`` is set (other chunks then carry
  ``"usage": null``, as OpenAI does), and ``data: [DONE]``.
  ``max_tokens`` / ``max_completion_tokens`` cut the reply with
  ``finish_reason: "length"``; an unknown model is 404 ``model_not_found``.
* Failure injection: ``fail_status`` (429 -> ``rate_limit_exceeded``, 5xx ->
  ``server_error``, the client maps these to ``RateLimitError`` /
  ``InternalServerError``) and ``slow_seconds`` (silence before answering).

Every response carries an ``x-request-id`` header like the real API.
"""
from __future__ import annotations

import itertools
import time

from .http import FakeHandler, FakeServer, dumps, split_tokens

__all__ = ["FakeOpenAI"]

SSE = "text/event-stream; charset=utf-8"
_ids = itertools.count(1)


def _error(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _mask(key: str) -> str:
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 7 else key


class FakeOpenAI(FakeServer):
    """Fake OpenAI server.  Keyword arguments are plain attributes that tests
    may change at any time."""

    def __init__(self, *, models=("gpt-4o-mini",), api_key: str | None = "sk-test",
                 reply: str = "Hello from fake OpenAI.", token_delay: float = 0.0,
                 fail_status: int | None = None, slow_seconds: float | None = None,
                 host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.models = tuple(models)
        self.api_key = api_key
        self.reply = reply
        self.token_delay = token_delay
        self.fail_status = fail_status
        self.slow_seconds = slow_seconds
        self.created = int(time.time())

    # -- plumbing --------------------------------------------------------------
    def _send(self, h: FakeHandler, status: int, obj: dict) -> None:
        h.send_json(status, obj, {"x-request-id": f"req_fake{next(_ids):08d}"})

    def _authorized(self, h: FakeHandler) -> bool:
        if self.api_key is None:
            return True
        auth = h.headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            self._send(h, 401, _error(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error", "invalid_api_key"))
            return False
        given = auth[7:].strip()
        if given != self.api_key:
            self._send(h, 401, _error(
                f"Incorrect API key provided: {_mask(given)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error", "invalid_api_key"))
            return False
        return True

    def _model(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "fake"}

    # -- routing ----------------------------------------------------------------
    def handle(self, h: FakeHandler) -> None:
        if not self._authorized(h):
            return
        route = h.route.rstrip("/")
        if h.command == "GET" and route == "/v1/models":
            return self._send(h, 200, {"object": "list",
                                       "data": [self._model(m) for m in self.models]})
        if h.command == "GET" and route.startswith("/v1/models/"):
            model_id = route[len("/v1/models/"):]
            if model_id in self.models:
                return self._send(h, 200, self._model(model_id))
            return self._send(h, 404, _error(
                f"The model '{model_id}' does not exist", "invalid_request_error",
                "model_not_found", "model"))
        if h.command == "POST" and route == "/v1/chat/completions":
            return self._chat(h)
        self._send(h, 404, _error(f"Invalid URL ({h.command} {h.route})",
                                  "invalid_request_error", None))

    # -- chat completions ---------------------------------------------------------
    def _fail(self, h: FakeHandler, status: int) -> None:
        if status == 429:
            body = _error("Rate limit reached for requests. Please try again in 1s.",
                          "rate_limit_exceeded", "rate_limit_exceeded")
        elif status >= 500:
            body = _error("The server had an error while processing your request. "
                          "Sorry about that!", "server_error", None)
        else:
            body = _error(f"Injected failure (HTTP {status}).", "invalid_request_error", None)
        self._send(h, status, body)

    def _chat(self, h: FakeHandler) -> None:
        body = h.body or {}
        if self.slow_seconds:
            self.sleep(self.slow_seconds)
        if self.fail_status:
            return self._fail(h, int(self.fail_status))
        model = body.get("model")
        if not model:
            return self._send(h, 400, _error("you must provide a model parameter",
                                             "invalid_request_error", None))
        if model not in self.models:
            return self._send(h, 404, _error(
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error", "model_not_found"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._send(h, 400, _error(
                "[] is too short - 'messages'" if messages == [] else
                "Missing required parameter: 'messages'.",
                "invalid_request_error", "missing_required_parameter" if messages is None
                else None, "messages"))

        tokens = split_tokens(self.reply)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and 0 < limit < len(tokens):
            tokens, finish = tokens[:limit], "length"
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages
                            if isinstance(m, dict)) + 3 * len(messages)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        base = {"id": f"chatcmpl-fake{next(_ids):012d}", "created": int(time.time()),
                "model": model, "system_fingerprint": "fp_fake"}

        if not body.get("stream"):
            for _ in tokens[1:]:
                self.sleep(self.token_delay)
            message = {"role": "assistant", "content": "".join(tokens), "refusal": None}
            return self._send(h, 200, {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        def event(choices: list, **more) -> str:
            obj = {**base, "object": "chat.completion.chunk", "choices": choices, **extra, **more}
            return f"data: {dumps(obj)}\n\n"

        def choice(delta: dict, reason: str | None = None) -> list:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]

        h.start_chunked(200, SSE, {"x-request-id": f"req_fake{next(_ids):08d}",
                                   "Cache-Control": "no-cache"})
        h.send_chunk(event(choice({"role": "assistant", "content": "", "refusal": None})))
        for i, tok in enumerate(tokens):
            if i:
                self.sleep(self.token_delay)
            h.send_chunk(event(choice({"content": tok})))
        h.send_chunk(event(choice({}, finish)))
        if include_usage:
            h.send_chunk(event([], usage=usage))
        h.end_chunked("data: [DONE]\n\n")


def _text(content) -> str:
    """Message content is a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
