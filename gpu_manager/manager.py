"""The one object per GPU worker process that owns the GPU's memory.

It is built lazily by the first GPU task (never at import: no device probing
on import), holds the local engines, and makes every ownership change in the
order its queue `gpu.<slot>` delivers them. The state machine and its invariants
are in docs/gpu-arbitration.md; in short:

- a local model is requested: if the GPU was not the local models', wait
  until no Ollama generation holds a lease, unload every model Ollama holds
  (and wait until `/api/ps` lists none), then make the requested engine
  resident (plus the admin's "preload" ones), evicting the least recently
  used engines when the local memory budget would be exceeded;
- an external owner is requested (Ollama, or an OpenAI endpoint that frees
  the GPU): unload every local engine (or offload it to host memory, when
  the admin asked for warm offload), record the new owner, and for Ollama
  grant a lease to the generation that follows.

Every step is recorded in Redis (the fenced state, an event with
before/after/freed/seconds, the last memory reading) and reported to
`on_event` for the user's socket. Nothing is loaded or unloaded when the
owner and the resident set already match the request.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from django.conf import settings

from chatsite.errors import CodedError
from chatsite.ollama_client import OllamaUnavailable, ollama_unload_all
from gpu_manager.engines import ENGINES, EngineLoadError, LocalEngine, engine_create
from gpu_manager.leases import Leases
from gpu_manager.memory import memory_snapshot
from gpu_manager.state import GpuState, GpuStateStore, LocalSpec

log = logging.getLogger(__name__)

#: on_event(phase, payload): progress for the socket of the message that
#: caused the switch ("unloading_local", "unloaded_local", ...).
EventSink = Callable[[str, dict], None]


def _ignore(phase: str, payload: dict) -> None:
    pass


class LeaseWaitTimeout(CodedError):
    code = "gpu_busy"


@dataclass(frozen=True)
class Timings:
    """The manager's waits, read from settings once, when it is built
    (chatsite/settings.py says where each value comes from)."""

    #: A granted Ollama lease lives this long until its generation renews it.
    lease_pending_ttl: float = 120.0
    #: How long a local model waits for Ollama generations to let go.
    lease_wait_timeout: float = 900.0
    lease_poll: float = 0.05
    #: How long Ollama gets to show its memory released after an unload.
    ollama_unload_timeout: float = 15.0
    ollama_unload_poll: float = 0.05

    @classmethod
    def from_settings(cls) -> "Timings":
        return cls(lease_pending_ttl=settings.GPU_LEASE_PENDING_TTL,
                   lease_wait_timeout=settings.GPU_LEASE_WAIT_TIMEOUT, lease_poll=settings.GPU_LEASE_POLL,
                   ollama_unload_timeout=settings.OLLAMA_UNLOAD_TIMEOUT,
                   ollama_unload_poll=settings.OLLAMA_UNLOAD_POLL)


def _transition(method):
    """Run a method that loads, unloads or writes the state under the
    manager's lock, so that `state_sync` (from the housekeeping thread)
    never sees engines loaded but not yet written, and never bumps the epoch
    between a transition's read and its fenced write (which would fail that
    transition with StaleState)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class GpuManager:
    def __init__(self, *, slot: str, device: str, store: GpuStateStore, leases: Leases,
                 budget_bytes: int = 0, timings: Timings = Timings()):
        self.slot = slot
        self.timings = timings
        self.device = device
        self.store = store
        self.leases = leases
        #: Bytes the local engines may hold together (0 = no limit).
        self.budget_bytes = budget_bytes
        self.engines: dict[str, LocalEngine] = {}
        #: Held by every transition (the solo pool's thread) and by
        #: state_sync (the housekeeping thread); see _transition.
        self._lock = threading.RLock()
        #: Called with the holders of leases that expired: their generation
        #: died. The chat layer sets it to fail their replies; gpu_manager
        #: itself knows nothing of messages.
        self.on_leases_expired: Callable[[list[str]], None] = lambda holders: None
        #: Seconds the last `prepare_local` waited for Ollama's generations
        #: to end: their visit, not the switch (the scheduler's switch cost).
        self.lease_waited = 0.0

    @classmethod
    def from_settings(cls) -> "GpuManager":
        device = settings.GPU_DEVICE
        if device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        store = GpuStateStore(slot=settings.GPU_SLOT, events_kept=settings.GPU_EVENTS_KEPT)
        return cls(slot=settings.GPU_SLOT, device=device, store=store, leases=Leases(slot=settings.GPU_SLOT),
                   budget_bytes=settings.GPU_LOCAL_BUDGET_BYTES, timings=Timings.from_settings())

    # --- queries ------------------------------------------------------------

    def resident(self) -> list[str]:
        return sorted(name for name, engine in self.engines.items() if engine.loaded)

    def engine(self, name: str) -> LocalEngine:
        engine = self.engines.get(name)
        if engine is None or not engine.loaded:
            raise RuntimeError(f"{name} is not resident on GPU slot {self.slot}")
        return engine

    def idle_engines(self) -> list[str]:
        """Resident engines unused for longer than their keep-alive."""
        now = time.monotonic()
        return sorted(name for name, e in list(self.engines.items())
                      if e.loaded and e.keep_alive > 0 and now - e.last_used >= e.keep_alive)

    def reap_leases(self) -> None:
        expired = self.leases.reap()
        if expired:
            log.warning("GPU slot %s: leases of %s expired; their holders died", self.slot, expired)
            self.on_leases_expired(expired)

    # --- transitions --------------------------------------------------------

    @_transition
    def repair(self) -> GpuState:
        """At worker start: the state may say local models are resident from a
        process that died; this process holds none, so make the state say so."""
        state = self.state_sync(note="repaired at start")
        self.store.memory_write(memory_snapshot(self.device))
        return state

    def state_sync(self, *, note: str) -> GpuState | None:
        """Rewrite the state where it contradicts what this worker holds (I3),
        and return it; None when a transition is under way (it writes the
        state itself when it ends).

        At start the state may list the engines of a worker that died. While
        the worker runs, Redis may lose the state: a Redis that crashed, or
        came back without its data, reads owner "none" while local models
        are resident, and /api/gpu/ and the picker would say so until the
        next local message; the housekeeping thread calls this every tick.
        With no engine resident the worker cannot know whether Ollama or an
        OpenAI endpoint owns the GPU, so it only drops the local models the
        state lists (a local message still unloads Ollama before it loads,
        since the owner is then not "local").
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            state = self.store.read()
            resident = self.resident()
            if resident:
                if (state.owner, state.local_models, state.ollama_models) == ("local", resident, []):
                    return state
                owner, ollama_models = "local", []
            elif state.local_models:
                owner, ollama_models = ("none" if state.owner == "local" else state.owner), state.ollama_models
            else:
                return state
            log.warning("GPU slot %s: state said owner %s, local models %s; this worker holds %s; rewritten (%s)",
                        self.slot, state.owner, state.local_models, resident, note)
            new = self.store.write(state, owner=owner, local_models=resident, ollama_models=ollama_models)
            self._event("owner_change", model=owner, seconds=0.0, freed_bytes=0, previous=state.owner, note=note)
            return new
        finally:
            self._lock.release()

    @_transition
    def forget(self) -> None:
        """At a clean worker shutdown: the engines die with the process, so
        the state must stop listing them (a crash is repaired at restart)."""
        state = self.store.read()
        if state.local_models:
            owner = "none" if state.owner == "local" else state.owner
            self.store.write(state, owner=owner, local_models=[])
            self._event("owner_change", model=owner, seconds=0.0, freed_bytes=0, note="worker stopped")

    @_transition
    def prepare_local(self, *, spec: LocalSpec, preload: list[LocalSpec] = (), ollama_urls: list[str] = (),
                      on_event: EventSink = _ignore) -> GpuState:
        """Make `spec` resident and the local models the GPU's owner."""
        state = self.store.read()
        self.lease_waited = 0.0
        engine = self.engines.get(spec.name)
        if state.owner == "local" and engine is not None and engine.loaded and _serves(engine, spec):
            engine.touch()
            # An admin's edit of these takes effect at the model's next use.
            engine.keep_alive, engine.warm_offload = spec.keep_alive, spec.warm_offload
            return state  # the common case: nothing to do, no Redis write
        taking_over = state.owner != "local"
        if taking_over:
            self._leases_wait(on_event)
            self._unload_ollama(ollama_urls, on_event)
            if state.ollama_models:
                # Written before loading, so that a load that fails leaves a
                # state that is still true: nothing of Ollama's is resident.
                state = self.store.write(state, ollama_models=[])
        self._ensure_resident(spec, on_event)
        if taking_over:
            for extra in preload:
                if extra.name != spec.name:
                    self._preload(extra, on_event)
        previous = state.owner
        state = self.store.write(state, owner="local", local_models=self.resident(), ollama_models=[])
        if previous != "local":
            self._owner_changed(previous, "local", on_event)
        return state

    @_transition
    def acquire_external(self, *, owner: str, holder: int | str | None = None, ollama_model: str | None = None,
                         on_event: EventSink = _ignore) -> GpuState:
        """Free the GPU of local models for `owner` ("ollama" or "openai").
        For Ollama, `holder` (the message id) gets a lease that the
        generation renews while it streams."""
        state = self.store.read()
        self.lease_waited = 0.0
        ollama_models = list(state.ollama_models)
        if ollama_model and ollama_model not in ollama_models:
            ollama_models.append(ollama_model)
        if not (state.owner == owner and not self.resident() and ollama_models == state.ollama_models):
            for engine in [e for e in self.engines.values() if e.loaded]:
                self._unload_engine(engine, on_event, reason="external")
            previous = state.owner
            state = self.store.write(state, owner=owner, local_models=[], ollama_models=ollama_models)
            if previous != owner:
                self._owner_changed(previous, owner, on_event)
        if owner == "ollama" and holder is not None:
            # Long enough for the generation to be picked up by a CPU worker;
            # once it streams it renews with the shorter GPU_LEASE_TTL.
            self.leases.grant(holder, ttl=self.timings.lease_pending_ttl)
        return state

    @_transition
    def unload_local(self, *, names: list[str] | None = None, reason: str, on_event: EventSink = _ignore) -> list[str]:
        """Unload resident engines (all, or `names`), e.g. idle ones or on an
        admin's request; the owner becomes "none" when none is left."""
        state = self.store.read()
        chosen = [e for n, e in sorted(self.engines.items()) if e.loaded and (names is None or n in names)]
        for engine in chosen:
            self._unload_engine(engine, on_event, reason=reason)
        if chosen:
            owner = state.owner if self.resident() or state.owner != "local" else "none"
            self.store.write(state, owner=owner, local_models=self.resident())
            if owner != state.owner:
                self._owner_changed(state.owner, owner, on_event)
        return [e.name for e in chosen]

    # --- steps --------------------------------------------------------------

    def _ensure_resident(self, spec: LocalSpec, on_event: EventSink) -> LocalEngine:
        engine = self.engines.get(spec.name)
        if engine is not None and not _serves(engine, spec):
            self._unload_engine(engine, on_event, reason="path_changed", warm=False)
            engine = None
        if engine is not None and engine.loaded:
            engine.touch()
            return engine
        if engine is None:
            engine = engine_create(spec, device=self.device)
        engine.keep_alive, engine.warm_offload = spec.keep_alive, spec.warm_offload
        self._make_room(engine, on_event)
        self._load_engine(engine, on_event)
        self.engines[spec.name] = engine
        return engine

    def _preload(self, spec: LocalSpec, on_event: EventSink) -> None:
        try:
            self._ensure_resident(spec, on_event)
        except EngineLoadError as exc:
            # A preload is a convenience: its failure must not fail the
            # message that asked for another model.
            log.warning("GPU slot %s: preload of %s failed: %s", self.slot, spec.name, exc)
            on_event("preload_failed", {"model": spec.name, "detail": str(exc)})

    def _make_room(self, engine: LocalEngine, on_event: EventSink) -> None:
        """Evict least recently used engines until `engine` fits the budget."""
        if not self.budget_bytes:
            return
        need = engine.nbytes if engine.offloaded else _weights_bytes(engine.path)
        if need > self.budget_bytes:
            raise EngineLoadError(f"{engine.name} needs {need} bytes, more than the local budget of "
                                  f"{self.budget_bytes} (GPU_LOCAL_BUDGET_BYTES)")
        resident = sorted((e for e in self.engines.values() if e.loaded and e is not engine),
                          key=lambda e: e.last_used)
        while resident and sum(e.nbytes for e in resident) + need > self.budget_bytes:
            self._unload_engine(resident.pop(0), on_event, reason="budget")

    def _load_engine(self, engine: LocalEngine, on_event: EventSink) -> None:
        warm = engine.offloaded
        on_event("loading_local", {"model": engine.name, "warm": warm})
        before = memory_snapshot(self.device)
        started = time.perf_counter()
        engine.restore() if warm else engine.load()
        seconds = time.perf_counter() - started
        after = memory_snapshot(self.device)
        payload = self._event("local_load", model=engine.name, seconds=seconds, freed_bytes=0, warm=warm,
                              loaded_bytes=engine.nbytes, before=before, after=after)
        on_event("loaded_local", payload)

    def _unload_engine(self, engine: LocalEngine, on_event: EventSink, *, reason: str,
                       warm: bool | None = None) -> None:
        warm = engine.warm_offload if warm is None else warm
        on_event("unloading_local", {"model": engine.name, "warm": warm})
        before = memory_snapshot(self.device)
        started = time.perf_counter()
        if warm:
            engine.offload()
            survivors = {}
        else:
            survivors = engine.unload()
            self.engines.pop(engine.name, None)
        seconds = time.perf_counter() - started
        after = memory_snapshot(self.device)
        freed = {k: before[k] - after[k] for k in before if isinstance(before[k], int) and k in after}
        payload = self._event("local_unload", model=engine.name, seconds=seconds,
                              freed_bytes=before["allocated"] - after["allocated"], freed=freed,
                              before=before, after=after, survivors=survivors, reason=reason, warm=warm)
        on_event("unloaded_local", payload)

    def _leases_wait(self, on_event: EventSink) -> None:
        """Wait until no Ollama generation holds the GPU. A holder that died
        stops holding it when its lease expires; its reply is then failed."""
        began = time.monotonic()
        deadline = began + self.timings.lease_wait_timeout
        announced = False
        while True:
            self.reap_leases()
            live = self.leases.live()
            if not live:
                self.lease_waited = time.monotonic() - began
                return
            if not announced:
                on_event("waiting_for_ollama", {"generations": len(live)})
                announced = True
            if time.monotonic() > deadline:
                raise LeaseWaitTimeout(f"Ollama generations {live} still hold GPU slot {self.slot}")
            time.sleep(self.timings.lease_poll)

    def _unload_ollama(self, ollama_urls: list[str], on_event: EventSink) -> None:
        for url in ollama_urls:
            on_event("unloading_ollama", {"endpoint": url})
            try:
                result = ollama_unload_all(url, timeout=self.timings.ollama_unload_timeout,
                                           poll=self.timings.ollama_unload_poll)
            except OllamaUnavailable as exc:
                # A server that does not answer cannot be asked to unload;
                # failing here would make a down Ollama block every local
                # model. Say so, in the log, the events and to the user.
                log.warning("GPU slot %s: cannot unload Ollama at %s: %s", self.slot, url, exc)
                self._event("ollama_unreachable", model="", seconds=0.0, freed_bytes=0, endpoint=url,
                            detail=str(exc))
                on_event("ollama_unreachable", {"endpoint": url, "detail": str(exc)})
                continue
            if result.models:
                payload = self._event("ollama_unload", model=",".join(result.models), seconds=result.seconds,
                                      freed_bytes=result.size_vram_freed, endpoint=url)
                on_event("unloaded_ollama", payload)

    def _owner_changed(self, previous: str, owner: str, on_event: EventSink) -> None:
        payload = self._event("owner_change", model=owner, seconds=0.0, freed_bytes=0, previous=previous)
        on_event("owner", {**payload, "owner": owner})

    def _event(self, kind: str, **fields) -> dict:
        event = {"at": time.time(), "slot": self.slot, "kind": kind, **fields}
        self.store.event_add(event)
        self.store.memory_write(fields.get("after") or memory_snapshot(self.device))
        log.info("GPU slot %s: %s %s freed=%s seconds=%.3f", self.slot, kind, fields.get("model"),
                 fields.get("freed_bytes"), fields.get("seconds", 0.0))
        return event


def _serves(engine: LocalEngine, spec: LocalSpec) -> bool:
    """The engine is what the spec asks for: the same directory, the same
    kind, the same settings (an admin's edit of these reloads it)."""
    return (engine.path == spec.path and type(engine) is ENGINES[spec.engine]
            and getattr(engine, "spec_options", ()) == spec.options)


def _weights_bytes(path: str) -> int:
    """Bytes of a model directory's weight files: what loading it will cost."""
    files = [f for pattern in ("*.safetensors", "*.bin") for f in Path(path).glob(pattern)]
    return sum(f.stat().st_size for f in files)
