"""Which models users can pick: local rows from the admin, plus the models
discovered on each Ollama and OpenAI-compatible endpoint, named per
CONTRACT §3 (`ollama_<tag>`, `openai_<id>`).

Discovery results (and failures) are cached briefly in the shared cache, so
a page load or a message does not call every endpoint, and a down endpoint
costs one connect timeout per TTL, not one per request.

Resolving a message's model is on every message's path, so each process
also keeps what it read (`_Memo`): the endpoints, and each discovery until
the shared entry's own expiry. One Redis GET per message checks the
catalog's version, which every change of an endpoint row and every
`catalog_forget` moves on: an admin's edit is seen by every process at its
next message, as before, without two queries and a cache read each time.
"""
from __future__ import annotations

import functools
import hashlib
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache import caches
from django.db import connection, transaction
from redis.exceptions import RedisError

from chat.models import ENDPOINT_KINDS, ENGINE_OF_KIND, LOCAL_KINDS, ModelConfig, ModelKind
from gpu_manager.state import LocalSpec
from chatsite.errors import CodedError
from chatsite.openai_client import OpenAIEndpointError, openai_models
from chatsite.ollama_client import OllamaError, ollama_tags
from chatsite.redis_client import redis_client

PREFIXES = {ModelKind.OLLAMA: "ollama_", ModelKind.OPENAI: "openai_"}
#: Moved on (INCR) by every change the memos must see (`catalog_changed`).
VERSION_KEY = "catalog:version"
DEFAULT_GENERATION = {"max_new_tokens": 512, "temperature": 0.7, "top_p": 0.95}


class CatalogError(CodedError):
    code = "catalog_error"


class UnknownModel(CatalogError):
    code = "unknown_model"


class ModelDisabled(CatalogError):
    code = "model_disabled"


class NotAChatModel(CatalogError):
    """A local engine of another kind (embedding, translation) named as a chat model."""

    code = "not_a_chat_model"


class EndpointDown(CatalogError):
    code = "endpoint_unavailable"


@dataclass(frozen=True)
class Endpoint:
    kind: str
    base_url: str
    api_key: str = ""
    frees_gpu: bool = True
    generation: dict = field(default_factory=lambda: dict(DEFAULT_GENERATION))


@dataclass(frozen=True)
class ModelChoice:
    """A model a user can pick, with everything a task needs to run it."""

    name: str
    kind: str
    upstream: str  # local: model directory; ollama: tag; openai: model id
    base_url: str = ""
    api_key: str = ""
    frees_gpu: bool = True
    generation: dict = field(default_factory=lambda: dict(DEFAULT_GENERATION))

    def as_task_kwargs(self) -> dict | None:
        """The choice for a task's arguments, so that the worker need not
        resolve it again (two queries and a cache read per message); None
        for a choice with a secret (an API key must not sit in the broker's
        queues and unacked hash: that worker resolves it)."""
        if self.api_key:
            return None
        return {"name": self.name, "kind": self.kind, "upstream": self.upstream, "base_url": self.base_url,
                "frees_gpu": self.frees_gpu, "generation": dict(self.generation)}

    @property
    def needs_gpu_owner(self) -> str | None:
        """The GPU owner this model needs, or None if it does not touch the GPU."""
        if self.kind == ModelKind.OPENAI and not self.frees_gpu:
            return None
        return self.kind


def endpoints() -> list[Endpoint]:
    """Enabled endpoints: the admin's rows, plus the ones named in the
    environment (CONTRACT §2) unless a row already points at the same URL."""
    found = [
        Endpoint(kind=c.kind, base_url=c.base_url.rstrip("/"), api_key=c.api_key,
                 frees_gpu=c.frees_gpu, generation=c.generation_defaults())
        for c in ModelConfig.objects.filter(enabled=True, kind__in=ENDPOINT_KINDS)
    ]
    known = {(e.kind, e.base_url) for e in found}
    configured = {
        ModelKind.OLLAMA: (settings.OLLAMA_BASE_URL, ""),
        ModelKind.OPENAI: (settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY),
    }
    disabled = set(
        ModelConfig.objects.filter(enabled=False, kind__in=ENDPOINT_KINDS).values_list("kind", "base_url")
    )
    for kind, (url, key) in configured.items():
        url = url.rstrip("/")
        if url and (kind, url) not in known and (kind, url) not in disabled:
            found.append(Endpoint(kind=kind, base_url=url, api_key=key))
    return found



@functools.cache
def _discoveries():
    """One cache client per process. Django's `cache` is one per thread,
    and under the CPU worker's gevent pool one per greenlet, which is one
    per task: a Redis connection opened for each message and dropped after
    it. The client is safe to share (redis-py's pool)."""
    return caches.create_connection("default")


def _cache_key(endpoint: Endpoint) -> str:
    digest = hashlib.sha1(f"{endpoint.kind} {endpoint.base_url}".encode()).hexdigest()[:16]
    return f"catalog:{digest}"


def endpoint_models(endpoint: Endpoint, *, memo: bool = False) -> list[str]:
    """Model names the endpoint offers now; raises EndpointDown. `memo`:
    from this process's memo when it has them (only after `_memo.endpoints()`
    checked the catalog's version: a message's model, `_resolve_remote`)."""
    cached = _memo.discovery(endpoint) if memo else None
    if cached is None:
        cached = _discoveries().get(_cache_key(endpoint))
    if cached is None:
        try:
            if endpoint.kind == ModelKind.OLLAMA:
                found = ollama_tags(endpoint.base_url)
            else:
                found = openai_models(endpoint.base_url, endpoint.api_key)
            cached = {"ok": True, "models": found, "detail": ""}
        except (OllamaError, OpenAIEndpointError) as exc:
            cached = {"ok": False, "models": [], "detail": str(exc)}
        cached["until"] = time.time() + settings.MODEL_DISCOVERY_TTL
        _discoveries().set(_cache_key(endpoint), cached, timeout=settings.MODEL_DISCOVERY_TTL)
    if memo:
        _memo.discovery_keep(endpoint, cached)
    if not cached["ok"]:
        raise EndpointDown(cached["detail"])
    return cached["models"]


class _Memo:
    """This process's copy of the endpoints and their discoveries, good
    while the catalog's version in Redis is the one it was read under (a
    discovery also only until its shared entry expires)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._version: bytes | None = None
        self._endpoints: list[Endpoint] | None = None
        self._discovered: dict[str, dict] = {}

    def endpoints(self) -> list[Endpoint]:
        """The endpoints, read again when the version moved (one GET)."""
        version = redis_client().get(VERSION_KEY)
        with self._lock:
            if self._endpoints is not None and version == self._version:
                return self._endpoints
        found = endpoints()
        if not connection.in_atomic_block:  # never keep what a transaction may yet roll back
            with self._lock:
                self._version, self._endpoints, self._discovered = version, found, {}
        return found

    def discovery(self, endpoint: Endpoint) -> dict | None:
        kept = self._discovered.get(_cache_key(endpoint))
        return kept if kept is not None and kept.get("until", 0) > time.time() else None

    def discovery_keep(self, endpoint: Endpoint, cached: dict) -> None:
        if self._endpoints is not None:
            self._discovered[_cache_key(endpoint)] = cached

    def forget(self) -> None:
        with self._lock:
            self._version, self._endpoints, self._discovered = None, None, {}


_memo = _Memo()


def catalog_changed(**_) -> None:
    """Every process reads the catalog again at its next message (an
    endpoint row saved or deleted: chat/apps.py; `catalog_forget`).

    Moved on at once and again when the change commits: a process that
    read the rows between the two (the change not yet visible) keeps them
    only until the second."""
    _version_move()
    transaction.on_commit(_version_move)


def _version_move() -> None:
    redis_client().incr(VERSION_KEY)
    _memo.forget()


def catalog_flushed(**_) -> None:
    """After a migrate or a flush (post_migrate: chat/apps.py), which change
    rows without their signals (a flush deletes every row). A migrate may
    run with no Redis up (`make setup`): then no process holds a memo to
    drop but this one."""
    try:
        _version_move()
    except RedisError:
        _memo.forget()


def catalog_forget() -> None:
    """Drop cached discoveries (after an admin edit, or in tests)."""
    _discoveries().delete_many([_cache_key(e) for e in endpoints()])
    catalog_changed()


def catalog_list() -> tuple[list[ModelChoice], list[dict]]:
    """Every model users can pick now, and the endpoints that are down."""
    choices = [_local_choice(c) for c in ModelConfig.objects.filter(kind=ModelKind.LOCAL, enabled=True)]
    errors = []
    for endpoint in endpoints():
        try:
            names = endpoint_models(endpoint)
        except EndpointDown as exc:
            errors.append({"endpoint": endpoint.base_url, "kind": endpoint.kind, "detail": str(exc)})
            continue
        choices.extend(_remote_choice(endpoint, n) for n in names)
    return choices, errors


def model_resolve(name: str) -> ModelChoice:
    """The model a user named, or UnknownModel / ModelDisabled / EndpointDown."""
    if "\x00" in name:  # no model has one, and PostgreSQL refuses it even in a query
        raise UnknownModel(f"No model is named {name!r}.")
    for kind, prefix in PREFIXES.items():
        if name.startswith(prefix):
            return _resolve_remote(kind, name.removeprefix(prefix))
    config = ModelConfig.objects.filter(kind__in=LOCAL_KINDS, name=name).first()
    if config is None:
        raise UnknownModel(f"No model is named {name!r}.")
    if config.kind != ModelKind.LOCAL:
        use = "POST /v1/embeddings" if config.kind == ModelKind.EMBEDDING else "message.translate"
        raise NotAChatModel(f"{name!r} is a {config.kind} model, not a chat model: use it through {use}.")
    if not config.enabled:
        raise ModelDisabled(f"The model {name!r} is disabled.")
    return _local_choice(config)


def default_model_name() -> str | None:
    config = ModelConfig.objects.filter(enabled=True, is_default=True, kind__in=(
        ModelKind.LOCAL, *ENDPOINT_KINDS)).first()
    return config.name if config and config.kind == ModelKind.LOCAL else None


def _resolve_remote(kind: str, upstream: str) -> ModelChoice:
    down = []
    for endpoint in (e for e in _memo.endpoints() if e.kind == kind):
        try:
            if upstream in endpoint_models(endpoint, memo=True):
                return _remote_choice(endpoint, upstream)
        except EndpointDown as exc:
            down.append(str(exc))
    if down:
        raise EndpointDown("; ".join(down))
    raise UnknownModel(f"No {kind} endpoint offers the model {upstream!r}.")


def _local_choice(config: ModelConfig) -> ModelChoice:
    return ModelChoice(name=config.name, kind=ModelKind.LOCAL, upstream=config.path,
                       generation=config.generation_defaults())


def _remote_choice(endpoint: Endpoint, upstream: str) -> ModelChoice:
    return ModelChoice(
        name=PREFIXES[endpoint.kind] + upstream, kind=endpoint.kind, upstream=upstream,
        base_url=endpoint.base_url, api_key=endpoint.api_key, frees_gpu=endpoint.frees_gpu,
        generation=endpoint.generation,
    )


# --- local engines, as the GPU manager sees them --------------------------------

def local_spec(name: str, *, config: ModelConfig | None = None) -> LocalSpec:
    """What the GPU manager needs to load a local model of any kind (chat,
    embedding, translation) from its admin row. ModelConfig.DoesNotExist
    when there is none."""
    if config is None:
        config = ModelConfig.objects.get(kind__in=LOCAL_KINDS, name=name)
    options: tuple = ()
    if config.kind == ModelKind.EMBEDDING:
        options = (("pooling", config.pooling), ("query_prefix", config.query_prefix),
                   ("passage_prefix", config.passage_prefix))
    elif config.kind == ModelKind.TRANSLATION and config.target_list():
        options = (("targets", tuple(config.target_list())),)
    return LocalSpec(name=config.name, path=config.path, keep_alive=float(config.keep_alive),
                     warm_offload=config.warm_offload, engine=ENGINE_OF_KIND[config.kind], options=options)


def local_specs_preload() -> list[LocalSpec]:
    """The local models loaded whenever the local models take the GPU back:
    those the admin marked "preload" (the demo embedding and translation
    engines are, so that they are resident beside the chat model)."""
    return [local_spec(c.name, config=c) for c in ModelConfig.objects.filter(
        kind__in=LOCAL_KINDS, enabled=True, preload=True)]


def local_engine_config(kind: str, *, target: str | None = None) -> ModelConfig | None:
    """The enabled model of a local engine kind (embedding, translation)
    to use: the default one first, then by name; for translation, one that
    serves `target` (a multilingual model serves every target)."""
    configs = ModelConfig.objects.filter(kind=kind, enabled=True).order_by("-is_default", "name")
    for config in configs:
        if target is None or not config.target_list() or target in config.target_list():
            return config
    return None
