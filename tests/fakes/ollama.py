"""FakeOllama: a loopback HTTP server speaking Ollama's REST API.

Reproduces the parts of https://github.com/ollama/ollama/blob/main/docs/api.md
the service relies on, closely enough that the official ``ollama`` client
works unchanged (``ollama.Client(host=fake.url)``):

* ``GET /api/tags``, ``GET /api/version``, ``GET /api/ps``, ``GET /``.
* ``POST /api/chat`` / ``POST /api/generate``: NDJSON streaming (chunked,
  one line per token) or a single JSON object with ``"stream": false``;
  load (empty prompt/messages) and unload (``keep_alive`` 0) requests.
  What shapes the reply (the answer itself comes from ``model.py``):

  - ``options.num_predict`` > 0 stops after that many tokens,
    ``done_reason: "length"``; ``options.stop`` (strings) ends the reply
    before the first one, ``done_reason: "stop"``.  Other options (seed,
    temperature, ...) are only recorded.
  - ``tools`` with the user's message last: a tool call instead of text,
    ``content: ""`` and ``tool_calls: [{"id": "call_...", "function":
    {"index": 0, "name": <first tool>, "arguments": {...}}}]`` (arguments
    an object, built from the tool's parameter schema); streamed as one
    ``done: false`` line before the final one.  A ``tool`` message last
    (with or without ``tool_name``): ``The tool said: <its content>``.
  - ``format``: ``"json"`` gives ``{"answer": <reply>}``, a JSON schema an
    object with its required properties filled by type.
  - ``images`` (base64): the reply starts ``I see N image(s).``; one that is
    not base64 is a 400, as Go's JSON decoder reports it.
  - A model whose name contains ``embed`` answers 400 ``"m" does not support
    chat`` (or ``generate``); an unload still works.
* ``POST /api/embed``: ``{"model", "embeddings", "total_duration",
  "load_duration", "prompt_eval_count"}``, hashed unit vectors of
  ``embedding_dim`` (8) floats or ``dimensions`` (any size: the fake has no
  native one to truncate); an empty ``input`` only loads the model;
  ``keep_alive`` 0 unloads after the answer.  It loads like a chat; a model without ``embed`` in its
  name is loaded, then answered 501 ``this model does not support
  embeddings``; an unknown one is 404 ``model 'x' not found``.
* Errors as Ollama sends them: ``{"error": "..."}`` with 404 for an unknown
  model (``model "x" not found, try pulling it first``) and 400 for a
  missing one; anything else is 404 ``404 page not found`` (Go router).

Model residency is modelled because the GPU manager watches it: a chat or
generate loads the model (``/api/ps`` lists it with ``size_vram``); an unload
is *answered at once* but the model stays in ``/api/ps`` for
``unload_delay`` seconds, because real Ollama replies to the unload before
the runner has exited and VRAM is actually free.  A request that finds its
model not loaded waits ``load_delay`` seconds for the load (0: none), as a
real Ollama does (about 6.6 s for a 7B model, issue 13); requests that come
while the load is under way wait for that same load, and each reports the
seconds it waited as ``load_duration``.  Names without a tag
resolve to ``:latest`` as in Ollama.  ``stop()`` forgets loaded models (a
restarted Ollama has nothing in VRAM).

Failure injection for /api/chat (``fail``): ``"500"`` (HTTP 500 with an
Ollama error body), ``"close_midway"`` (half the tokens, then the connection
is dropped without the final chunk) and ``"slow"`` (``slow_seconds`` of
silence before the first byte).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from . import model as fake_model
from .http import FakeHandler, FakeServer, dumps, split_tokens

__all__ = ["FakeOllama"]

NDJSON = "application/x-ndjson"
DEFAULT_KEEP_ALIVE = 300.0  # Ollama keeps a model 5 minutes by default
_call_ids = itertools.count(1)
_BASE64 = re.compile(r"[A-Za-z0-9+/=]")


def _now_rfc3339(offset: float = 0.0) -> str:
    t = datetime.now(timezone.utc) + timedelta(seconds=offset)
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _norm(tag: str) -> str:
    return tag if ":" in tag else f"{tag}:latest"


def _is_zero(keep_alive) -> bool:
    """Ollama accepts keep_alive as seconds (int/float) or a Go duration string."""
    if keep_alive is None or isinstance(keep_alive, bool):
        return False
    if isinstance(keep_alive, (int, float)):
        return keep_alive == 0
    return bool(re.fullmatch(r"(0+(\.0*)?|\.0+)(ns|us|µs|ms|s|m|h)?", str(keep_alive).strip()))


def _details(tag: str) -> dict:
    family = re.split(r"[^a-z]", tag.split(":")[0].lower())[0] or "llama"
    m = re.search(r"(\d+(?:\.\d+)?)b", tag.split(":")[-1].lower())
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": f"{m.group(1)}B" if m else "7B", "quantization_level": "Q4_0"}


def _digest(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def _base64_error(images) -> str | None:
    """The 400 message Ollama's JSON decoder gives for ``images`` that are
    not standard base64 (Go's ``encoding/json`` decodes ``[]byte`` with
    ``base64.StdEncoding``, which skips only CR and LF), or ``None``."""
    for image in images or []:
        if not isinstance(image, str):
            return "json: cannot unmarshal non-string into Go value of type api.ImageData"
        data = image.replace("\r", "").replace("\n", "")
        try:
            base64.b64decode(data, validate=True)
        except binascii.Error:
            bad = next((i for i, c in enumerate(data) if not _BASE64.match(c)), len(data))
            return f"illegal base64 data at input byte {bad}"
    return None


@dataclass(frozen=True)
class PsAnswer:
    at: float
    models: list[str]


class FakeOllama(FakeServer):
    """Fake Ollama server.  All keyword arguments are plain attributes that
    tests may change at any time (even while the server runs)."""

    def __init__(self, *, models=("qwen:7b",), reply: str = "Hello from fake Ollama.",
                 token_delay: float = 0.0, unload_delay: float = 0.0, load_delay: float = 0.0,
                 size_vram: int = 2_370_000_000, fail: str | None = None,
                 slow_seconds: float = 30.0, embedding_dim: int = fake_model.EMBEDDING_DIM,
                 host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.models = tuple(models)
        self.embedding_dim = embedding_dim
        self.reply = reply
        self.token_delay = token_delay
        self.unload_delay = unload_delay
        self.load_delay = load_delay
        self.size_vram = size_vram
        self.fail = fail
        self.slow_seconds = slow_seconds
        self._lock = threading.Lock()
        self._loaded: dict[str, float | None] = {}  # tag -> time it leaves /api/ps
        self._ready_at: dict[str, float] = {}  # tag -> time its load (load_delay) ends
        #: Every /api/ps answer as (at, models): the proof a test needs that
        #: the server was seen empty, and when.
        self.ps_answers: list[PsAnswer] = []
        #: Residency and generation intervals (time.time()), for tests of
        #: the invariant that nothing local is resident while these run:
        #: [tag, loaded_at, unloaded_at or None] and (started, ended).
        self.residency: list[list] = []
        self.generations: list[tuple[float, float]] = []
        #: Loads that cost load_delay, as (started, ready).
        self.loads: list[tuple[float, float]] = []

    # -- residency (what /api/ps reports) --------------------------------------
    def load(self, tag: str) -> None:
        """Mark ``tag`` as loaded (test setup)."""
        self._load(tag, delay=0.0)

    def _load(self, tag: str, *, delay: float) -> float:
        """Load ``tag`` (residency starts now: a load takes the memory
        first) and return the seconds until it is ready: ``delay`` for a
        model that was not loaded, what is left of its load for one being
        loaded, 0 for a loaded one."""
        tag, now = _norm(tag), time.time()
        with self._lock:
            if tag not in self._loaded:
                self.residency.append([tag, now, None])
                if delay > 0:
                    self._ready_at[tag] = now + delay
                    self.loads.append((now, now + delay))
            self._loaded[tag] = None
            return max(0.0, self._ready_at.get(tag, now) - now)

    def _schedule_unload(self, tag: str) -> None:
        with self._lock:
            if _norm(tag) in self._loaded:
                self._loaded[_norm(tag)] = time.time() + max(0.0, self.unload_delay)

    def loaded_models(self) -> list[str]:
        """Tags currently listed by ``/api/ps`` (pending unloads included)."""
        now = time.time()
        with self._lock:
            for tag, gone_at in list(self._loaded.items()):
                if gone_at is not None and gone_at <= now:
                    del self._loaded[tag]
                    self._ready_at.pop(tag, None)
                    for interval in self.residency:
                        if interval[0] == tag and interval[2] is None:
                            interval[2] = gone_at
            return list(self._loaded)

    def stop(self) -> None:
        super().stop()
        with self._lock:
            self._loaded.clear()
            self._ready_at.clear()
            for interval in self.residency:
                if interval[2] is None:
                    interval[2] = time.time()

    def clear(self) -> None:
        super().clear()
        self.ps_answers = []
        self.generations = []
        self.loads = []
        with self._lock:
            self.residency = [r for r in self.residency if r[2] is None]

    def reset(self) -> None:
        """Forget loaded models and recordings: a freshly started server."""
        with self._lock:
            self._loaded.clear()
            self._ready_at.clear()
        self.clear()

    def _known(self, tag: str) -> bool:
        return _norm(tag) in {_norm(m) for m in self.models}

    # -- routing --------------------------------------------------------------
    def handle(self, h: FakeHandler) -> None:
        route = (h.command, h.route.rstrip("/") or "/")
        if route == ("GET", "/"):
            h.send_body(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif route == ("GET", "/api/version"):
            h.send_json(200, {"version": "0.12.0"})
        elif route == ("GET", "/api/tags"):
            h.send_json(200, {"models": [self._tag_entry(m) for m in self.models]})
        elif route == ("GET", "/api/ps"):
            loaded = self.loaded_models()
            self.ps_answers.append(PsAnswer(at=time.time(), models=loaded))
            h.send_json(200, {"models": [self._ps_entry(m) for m in loaded]})
        elif route == ("POST", "/api/chat"):
            self._generate(h, chat=True)
        elif route == ("POST", "/api/generate"):
            self._generate(h, chat=False)
        elif route == ("POST", "/api/embed"):
            self._embed(h)
        else:
            h.send_body(404, b"404 page not found", "text/plain")

    def _tag_entry(self, tag: str) -> dict:
        return {"name": _norm(tag), "model": _norm(tag), "modified_at": "2025-01-01T00:00:00.000000Z",
                "size": 4_500_000_000, "digest": _digest(tag), "details": _details(tag)}

    def _ps_entry(self, tag: str) -> dict:
        return {"name": tag, "model": tag, "size": self.size_vram, "size_vram": self.size_vram,
                "digest": _digest(tag), "details": _details(tag), "context_length": 4096,
                "expires_at": _now_rfc3339(DEFAULT_KEEP_ALIVE)}

    # -- /api/chat and /api/generate ----------------------------------------------
    def _generate(self, h: FakeHandler, chat: bool) -> None:
        body = h.body or {}
        images = [i for m in body.get("messages") or [] if isinstance(m, dict)
                  for i in m.get("images") or []] if chat else body.get("images")
        bad_images = _base64_error(images)  # the request's JSON does not decode
        if bad_images:
            return h.send_json(400, {"error": bad_images})
        model = body.get("model") or ""
        if not model:
            return h.send_json(400, {"error": "model is required"})
        if not self._known(model):
            return h.send_json(404, {"error": f'model "{model}" not found, try pulling it first'})
        field = "message" if chat else "response"
        empty = {"role": "assistant", "content": ""} if chat else ""
        unload = _is_zero(body.get("keep_alive"))
        prompt_empty = not body.get("messages") if chat else not body.get("prompt")
        if unload and (prompt_empty or not chat):
            self._schedule_unload(model)
            return h.send_json(200, {"model": model, "created_at": _now_rfc3339(), field: empty,
                                     "done_reason": "unload", "done": True})
        if fake_model.supports_embeddings(model):  # checked before the load, as Ollama does
            return h.send_json(400, {"error": f"{json.dumps(model)} does not support "
                                              f"{'chat' if chat else 'generate'}"})
        was_loaded = _norm(model) in self.loaded_models()
        load_wait = self._load(model, delay=self.load_delay)
        self.sleep(load_wait)
        if prompt_empty:
            return h.send_json(200, {"model": model, "created_at": _now_rfc3339(), field: empty,
                                     "done_reason": "load", "done": True})
        fail = self.fail if chat else None
        if fail == "500":
            return h.send_json(500, {"error": "llama runner process has terminated: exit status 2"})
        if fail == "slow":
            self.sleep(self.slow_seconds)
        started = time.time()
        try:
            self._reply(h, body, model, chat, field, was_loaded, fail, load_wait)
        finally:
            self.generations.append((started, time.time()))
        if unload:
            self._schedule_unload(model)

    def _load_duration(self, was_loaded: bool, load_wait: float) -> int:
        if self.load_delay:
            return int(load_wait * 1e9) if load_wait else 1_000
        return 1_000 if was_loaded else 500_000_000

    def _answer(self, body: dict, chat: bool) -> tuple[list, str, int]:
        """What the model generates: the pieces to stream (one message per
        token, or one message carrying the tool calls; plain strings for
        /api/generate), the ``done_reason`` and the ``eval_count``."""
        options = body.get("options") or {}
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)] if chat else []
        last = messages[-1] if messages else {}
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)] if chat else []
        if tools and last.get("role") == "user":
            function = tools[0].get("function") or {}
            arguments = fake_model.schema_value(function.get("parameters") or {"type": "object"})
            # Newer Ollama numbers each call in ``function.index`` and gives it an id.
            call = {"id": f"call_{next(_call_ids):08x}",
                    "function": {"index": 0, "name": function.get("name") or "",
                                 "arguments": arguments}}
            return ([{"role": "assistant", "content": "", "tool_calls": [call]}], "stop",
                    len(split_tokens(dumps(call["function"]))))
        if last.get("role") == "tool":
            text = fake_model.tool_result_reply(str(last.get("content") or ""))
        else:
            images = sum(len(m.get("images") or []) for m in messages) if chat \
                else len(body.get("images") or [])
            text = fake_model.images_note(images) + self.reply
        if body.get("format"):
            text = fake_model.structured_reply(body["format"], text)
        tokens, reason = fake_model.cut(text, stop=options.get("stop"),
                                        limit=options.get("num_predict"))
        pieces = [{"role": "assistant", "content": t} for t in tokens] if chat else tokens
        return pieces, reason, len(tokens)

    def _reply(self, h, body, model, chat, field, was_loaded, fail, load_wait=0.0) -> None:
        started = time.monotonic_ns()
        pieces, reason, eval_count = self._answer(body, chat)
        texts = [m.get("content") or "" for m in body.get("messages") or []] if chat \
            else [body.get("prompt") or "", body.get("system") or ""]
        prompt_count = max(1, sum(len(str(t).split()) for t in texts))

        def final(piece) -> dict:
            total = time.monotonic_ns() - started
            return {"model": model, "created_at": _now_rfc3339(), field: piece, "done": True,
                    "done_reason": reason, "total_duration": total + 1,
                    "load_duration": self._load_duration(was_loaded, load_wait),
                    "prompt_eval_count": prompt_count, "prompt_eval_duration": 1_000_000,
                    "eval_count": eval_count, "eval_duration": total}

        if body.get("stream", True) is False:
            for _ in pieces:
                self.sleep(self.token_delay)
            if not chat:
                return h.send_json(200, final("".join(pieces)))
            message = {"role": "assistant", "content": "".join(p["content"] for p in pieces)}
            calls = [c for p in pieces for c in p.get("tool_calls", [])]
            return h.send_json(200, final({**message, **({"tool_calls": calls} if calls else {})}))
        h.start_chunked(200, NDJSON)
        for i, piece in enumerate(pieces):
            if fail == "close_midway" and i >= len(pieces) // 2:
                h.abort()
            if i:
                self.sleep(self.token_delay)
            h.send_chunk(dumps({"model": model, "created_at": _now_rfc3339(),
                                field: piece, "done": False}) + "\n")
        if fail == "close_midway":
            h.abort()
        h.end_chunked(dumps(final({"role": "assistant", "content": ""} if chat else "")) + "\n")

    # -- /api/embed ---------------------------------------------------------------
    def _embed(self, h: FakeHandler) -> None:
        body = h.body or {}
        model, given = body.get("model") or "", body.get("input")
        if isinstance(given, str):
            texts = [given] if given else []
        elif isinstance(given, list) and all(isinstance(t, str) for t in given):
            texts = given
        elif given is None:
            texts = []
        else:
            return h.send_json(400, {"error": "invalid input type"})
        if not self._known(model):  # not chat's message: Ollama words this one differently
            return h.send_json(404, {"error": f"model '{model}' not found"})
        started = time.monotonic_ns()
        was_loaded = _norm(model) in self.loaded_models()
        load_wait = self._load(model, delay=self.load_delay)
        self.sleep(load_wait)
        try:
            # The runner, not the server, refuses: a chat model is loaded
            # first, then answered 501 (Ollama's own engine, ollamarunner, for
            # a model without pooling; server/routes.go EmbedHandler).
            if not fake_model.supports_embeddings(model):
                return h.send_json(501, {"error": "this model does not support embeddings"})
            if not texts:  # a load, as an empty chat is
                return h.send_json(200, {"model": model, "embeddings": []})
            dim = body.get("dimensions")
            dim = dim if isinstance(dim, int) and dim > 0 else self.embedding_dim
            computed = time.time()
            vectors = [fake_model.embedding(t, dim) for t in texts]
            self.generations.append((computed, time.time()))
            h.send_json(200, {
                "model": model, "embeddings": vectors,
                "total_duration": time.monotonic_ns() - started + 1,
                "load_duration": self._load_duration(was_loaded, load_wait),
                "prompt_eval_count": sum(max(1, len(t.split())) for t in texts)})
        finally:
            if _is_zero(body.get("keep_alive")):
                self._schedule_unload(model)
