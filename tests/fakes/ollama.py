"""FakeOllama: a loopback HTTP server speaking Ollama's REST API.

Reproduces the parts of https://github.com/ollama/ollama/blob/main/docs/api.md
the service relies on, closely enough that the official ``ollama`` client
works unchanged (``ollama.Client(host=fake.url)``):

* ``GET /api/tags``, ``GET /api/version``, ``GET /api/ps``, ``GET /``.
* ``POST /api/chat`` / ``POST /api/generate``: NDJSON streaming (chunked,
  one line per token) or a single JSON object with ``"stream": false``;
  load (empty prompt/messages) and unload (``keep_alive`` 0) requests.
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

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from .http import FakeHandler, FakeServer, dumps, split_tokens

__all__ = ["FakeOllama"]

NDJSON = "application/x-ndjson"
DEFAULT_KEEP_ALIVE = 300.0  # Ollama keeps a model 5 minutes by default


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
                 slow_seconds: float = 30.0, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.models = tuple(models)
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

    def _reply(self, h, body, model, chat, field, was_loaded, fail, load_wait=0.0) -> None:
        started = time.monotonic_ns()
        tokens = split_tokens(self.reply)
        texts = [m.get("content") or "" for m in body.get("messages") or []] if chat \
            else [body.get("prompt") or "", body.get("system") or ""]
        prompt_count = max(1, sum(len(str(t).split()) for t in texts))

        def piece(text: str):
            return {"role": "assistant", "content": text} if chat else text

        def final(text: str) -> dict:
            total = time.monotonic_ns() - started
            return {"model": model, "created_at": _now_rfc3339(), field: piece(text), "done": True,
                    "done_reason": "stop", "total_duration": total + 1,
                    "load_duration": (int(load_wait * 1e9) if load_wait else 1_000) if self.load_delay
                    else (1_000 if was_loaded else 500_000_000),
                    "prompt_eval_count": prompt_count, "prompt_eval_duration": 1_000_000,
                    "eval_count": len(tokens), "eval_duration": total}

        if body.get("stream", True) is False:
            for _ in tokens:
                self.sleep(self.token_delay)
            return h.send_json(200, final("".join(tokens)))
        h.start_chunked(200, NDJSON)
        for i, tok in enumerate(tokens):
            if fail == "close_midway" and i >= len(tokens) // 2:
                h.abort()
            if i:
                self.sleep(self.token_delay)
            h.send_chunk(dumps({"model": model, "created_at": _now_rfc3339(),
                                     field: piece(tok), "done": False}) + "\n")
        if fail == "close_midway":
            h.abort()
        h.end_chunked(dumps(final("")) + "\n")
