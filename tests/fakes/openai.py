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
  What shapes the reply (the answer itself comes from ``model.py``):

  - ``stop`` (a string or a list) ends it before the first stop string,
    ``finish_reason: "stop"``.
  - ``n``: that many choices (the same text), ``index`` 0..n-1; streamed
    interleaved, each chunk carrying one choice; usage counts them all.
  - ``tools``, with the user's message last (or ``tool_choice``
    ``"required"`` or naming a function) and ``tool_choice`` not
    ``"none"``: ``content: null``, one call ``{"id": "call_...", "type":
    "function", "function": {"name", "arguments": <JSON string>}}`` of the
    named tool, else the first, its arguments built from the parameter
    schema; ``finish_reason: "tool_calls"``.  Streamed as OpenAI does: a
    delta with the call's index, id, type, name and ``arguments: ""``, then
    deltas with only the index and an arguments fragment (three).  A
    ``tool`` message last: ``The tool said: <its content>``.
  - ``response_format`` ``json_object``: ``{"answer": <reply>}``;
    ``json_schema``: an object with the schema's required properties.
  - ``image_url`` content parts: the reply starts ``I see N image(s).``
  - A model whose id contains ``embed`` is 404 "not a chat model".
* ``POST /v1/embeddings``: ``input`` a string, strings, a token array or
  token arrays; a ``list`` of ``embedding`` objects, hashed unit vectors of
  ``embedding_dim`` (8) floats or ``dimensions`` (400 for ``ada`` models),
  as float lists or with ``encoding_format: "base64"`` (the ``openai``
  client's default) little-endian float32.  A model without ``embed`` in
  its id is 403 ``You are not allowed to generate embeddings from this
  model``.
* Failure injection, for chat and embeddings: ``fail_status`` (429 ->
  ``rate_limit_exceeded``, 5xx -> ``server_error``, the client maps these to
  ``RateLimitError`` / ``InternalServerError``) and ``slow_seconds``
  (silence before answering).

Every response carries an ``x-request-id`` header like the real API.
"""
from __future__ import annotations

import itertools
import json
import time

from . import model as fake_model
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
                 embedding_dim: int = fake_model.EMBEDDING_DIM,
                 host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.models = tuple(models)
        self.embedding_dim = embedding_dim
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
        if h.command == "POST" and route == "/v1/embeddings":
            return self._embeddings(h)
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

    def _request(self, h: FakeHandler) -> tuple[dict, str] | None:
        """The checks chat and embeddings share: injected failures, then the
        model; ``None`` once an error has been answered."""
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
        return body, model

    def _chat(self, h: FakeHandler) -> None:
        checked = self._request(h)
        if checked is None:
            return
        body, model = checked
        if fake_model.supports_embeddings(model):
            return self._send(h, 404, _error(
                "This is not a chat model and thus not supported in the v1/chat/completions "
                "endpoint. Did you mean to use v1/completions?", "invalid_request_error", None,
                "model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._send(h, 400, _error(
                "[] is too short - 'messages'" if messages == [] else
                "Missing required parameter: 'messages'.",
                "invalid_request_error", "missing_required_parameter" if messages is None
                else None, "messages"))

        n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
        tool = _chosen_tool(body, messages)
        if tool is not None:
            arguments = json.dumps(fake_model.schema_value(
                tool.get("parameters") or {"type": "object"}))
            calls = [{"id": f"call_fake{next(_ids):012d}", "type": "function",
                      "function": {"name": tool.get("name") or "", "arguments": arguments}}
                     for _ in range(n)]
            tokens, finish = split_tokens(arguments), "tool_calls"
        else:
            calls = []
            tokens, finish = fake_model.cut(
                _reply_text(self.reply, body, messages), stop=body.get("stop"),
                limit=body.get("max_completion_tokens") or body.get("max_tokens"))
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages
                            if isinstance(m, dict)) + 3 * len(messages)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n * len(tokens),
                 "total_tokens": prompt_tokens + n * len(tokens)}
        base = {"id": f"chatcmpl-fake{next(_ids):012d}", "created": int(time.time()),
                "model": model, "system_fingerprint": "fp_fake"}

        if not body.get("stream"):
            for _ in tokens[1:]:
                self.sleep(self.token_delay)
            if calls:
                messages_out = [{"role": "assistant", "content": None, "refusal": None,
                                 "tool_calls": [call]} for call in calls]
            else:
                messages_out = [{"role": "assistant", "content": "".join(tokens),
                                 "refusal": None}] * n
            return self._send(h, 200, {**base, "object": "chat.completion", "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                for i, message in enumerate(messages_out)], "usage": usage})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        def event(choices: list, **more) -> str:
            obj = {**base, "object": "chat.completion.chunk", "choices": choices, **extra, **more}
            return f"data: {dumps(obj)}\n\n"

        def choice(index: int, delta: dict, reason: str | None = None) -> list:
            return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]

        h.start_chunked(200, SSE, {"x-request-id": f"req_fake{next(_ids):08d}",
                                   "Cache-Control": "no-cache"})
        if calls:
            # As OpenAI streams a call: its index, id, type and name first with
            # empty arguments, then only the index and argument fragments.
            for i, call in enumerate(calls):
                head = {"index": 0, **call, "function": {**call["function"], "arguments": ""}}
                h.send_chunk(event(choice(i, {"role": "assistant", "content": None,
                                              "tool_calls": [head], "refusal": None})))
                for j, fragment in enumerate(_thirds(call["function"]["arguments"])):
                    if j:
                        self.sleep(self.token_delay)
                    h.send_chunk(event(choice(i, {"tool_calls": [
                        {"index": 0, "function": {"arguments": fragment}}]})))
        else:
            for i in range(n):
                h.send_chunk(event(choice(i, {"role": "assistant", "content": "",
                                              "refusal": None})))
            for t, tok in enumerate(tokens):  # the choices interleave, as OpenAI sends them
                if t:
                    self.sleep(self.token_delay)
                for i in range(n):
                    h.send_chunk(event(choice(i, {"content": tok})))
        for i in range(n):
            h.send_chunk(event(choice(i, {}, finish)))
        if include_usage:
            h.send_chunk(event([], usage=usage))
        h.end_chunked("data: [DONE]\n\n")

    # -- embeddings -------------------------------------------------------------
    def _embeddings(self, h: FakeHandler) -> None:
        checked = self._request(h)
        if checked is None:
            return
        body, model = checked
        if not fake_model.supports_embeddings(model):
            return self._send(h, 403, _error(
                "You are not allowed to generate embeddings from this model",
                "invalid_request_error", None))
        inputs = _embedding_inputs(body.get("input"))
        if inputs is None:
            return self._send(h, 400, _error(
                "'$.input' is invalid. Please check the API reference: "
                "https://platform.openai.com/docs/api-reference.", "invalid_request_error", None))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            return self._send(h, 400, _error(
                f"'{encoding}' is not one of ['float', 'base64'] - 'encoding_format'",
                "invalid_request_error", None, "encoding_format"))
        dim = body.get("dimensions")
        if dim is not None and "ada" in model:  # text-embedding-ada-002 has one size
            return self._send(h, 400, _error("This model does not support specifying dimensions.",
                                             "invalid_request_error", None))
        dim = dim if isinstance(dim, int) and dim > 0 else self.embedding_dim
        data = []
        for i, (text, _) in enumerate(inputs):
            vector = fake_model.embedding(text, dim)
            data.append({"object": "embedding", "index": i, "embedding":
                         fake_model.embedding_base64(vector) if encoding == "base64" else vector})
        tokens = sum(count for _, count in inputs)
        self._send(h, 200, {"object": "list", "data": data, "model": model,
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _chosen_tool(body: dict, messages: list) -> dict | None:
    """The ``function`` of the tool the model calls, or ``None`` for text:
    the one ``tool_choice`` names, else the first; only when the user spoke
    last (a named or ``"required"`` choice forces a call), never for
    ``tool_choice: "none"``."""
    tools = [t.get("function") or {} for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    forced = choice == "required" or isinstance(choice, dict)
    if not forced and last.get("role") != "user":
        return None
    named = ((choice or {}).get("function") or {}).get("name") if isinstance(choice, dict) else None
    return next((t for t in tools if t.get("name") == named), tools[0])


def _reply_text(reply: str, body: dict, messages: list) -> str:
    """The text answer: a tool's result quoted when a tool spoke last, else
    ``reply`` after a word on the images shown, as JSON under ``response_format``."""
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    if last.get("role") == "tool":
        text = fake_model.tool_result_reply(_text(last.get("content")))
    else:
        images = sum(1 for m in messages if isinstance(m, dict)
                     and isinstance(m.get("content"), list)
                     for part in m["content"] if isinstance(part, dict)
                     and part.get("type") == "image_url")
        text = fake_model.images_note(images) + reply
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_object":
        return fake_model.structured_reply("json", text)
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        return fake_model.structured_reply(schema, text)
    return text


def _embedding_inputs(given) -> list[tuple[str, int]] | None:
    """``input`` as (text to hash, prompt tokens) per vector, or ``None``
    when invalid: a non-empty string, a list of them, a token array, or a
    list of token arrays."""
    def is_tokens(x) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(given, str):
        given = [given]
    elif is_tokens(given):
        given = [given]
    if not isinstance(given, list) or not given:
        return None
    inputs = []
    for item in given:
        if isinstance(item, str) and item:
            inputs.append((item, max(1, len(item.split()))))
        elif is_tokens(item):
            inputs.append((dumps(item), len(item)))
        else:
            return None
    return inputs


def _thirds(text: str) -> list[str]:
    """``text`` in up to three pieces, as a call's arguments are streamed."""
    step = max(1, -(-len(text) // 3))
    return [text[i:i + step] for i in range(0, len(text), step)] or [""]


def _text(content) -> str:
    """Message content is a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
