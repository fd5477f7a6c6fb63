"""The one object per GPU worker process that owns the GPU's memory.

It is built lazily by the first GPU task (never at import: no device probing
on import), holds the local engines, and makes every ownership change in the
order the `gpu` queue delivers them:

- a local model is requested: if the GPU was not the local models', unload
  every model Ollama holds (and wait until `/api/ps` lists none), then load
  the requested engine if it is not resident;
- an external owner is requested (Ollama, or an OpenAI endpoint that frees
  the GPU): unload every local engine, then record the new owner.

Each step is recorded in Redis (state with a fenced epoch, and an event with
before/after/freed/seconds) and reported to `on_event` for the user's socket.
Nothing is loaded or unloaded when the owner and the resident set already
match the request.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from django.conf import settings

from gpu_manager.engines import LocalEngine
from gpu_manager.memory import memory_snapshot
from gpu_manager.ollama import OllamaUnavailable, ollama_unload_all
from gpu_manager.state import GpuState, GpuStateStore

log = logging.getLogger(__name__)

#: on_event(phase, payload): progress for the socket of the message that
#: caused the switch ("unloading_local", "unloaded_local", ...).
EventSink = Callable[[str, dict], None]


def _ignore(phase: str, payload: dict) -> None:
    pass


class GpuManager:
    def __init__(self, *, slot: str, device: str, store: GpuStateStore):
        self.slot = slot
        self.device = device
        self.store = store
        self.engines: dict[str, LocalEngine] = {}

    @classmethod
    def from_settings(cls) -> "GpuManager":
        device = settings.GPU_DEVICE
        if device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        return cls(slot=settings.GPU_SLOT, device=device, store=GpuStateStore(slot=settings.GPU_SLOT))

    # --- queries ------------------------------------------------------------

    def resident(self) -> list[str]:
        return sorted(name for name, engine in self.engines.items() if engine.loaded)

    def engine(self, name: str) -> LocalEngine:
        engine = self.engines.get(name)
        if engine is None or not engine.loaded:
            raise RuntimeError(f"{name} is not resident on GPU slot {self.slot}")
        return engine

    # --- transitions --------------------------------------------------------

    def repair(self) -> GpuState:
        """At worker start: the state may say local models are resident from a
        process that died; this process holds none, so make the state say so."""
        state = self.store.read()
        if state.local_models and not self.resident():
            owner = "none" if state.owner == "local" else state.owner
            log.warning("GPU slot %s: state listed %s from a previous worker; repaired", self.slot,
                        state.local_models)
            state = self.store.write(state, owner=owner, local_models=[])
            self._event("owner_change", model="", seconds=0.0, freed_bytes=0, note="repaired at start")
        self.store.memory_write(memory_snapshot(self.device))
        return state

    def prepare_local(
        self, *, name: str, path: str, ollama_urls: list[str], on_event: EventSink = _ignore
    ) -> GpuState:
        """Make `name` resident and the local models the GPU's owner."""
        state = self.store.read()
        engine = self.engines.get(name)
        if state.owner == "local" and engine is not None and engine.loaded and engine.path == path:
            return state  # the common case: nothing to do, no Redis write
        if state.owner != "local":
            self._unload_ollama(ollama_urls, on_event)
            if state.ollama_models:
                # Written before loading, so that a load that fails leaves a
                # state that is still true: nothing of Ollama's is resident.
                state = self.store.write(state, ollama_models=[])
        if engine is not None and engine.loaded and engine.path != path:
            self._unload_engine(engine, on_event)  # the admin pointed the name at another directory
        if engine is None or not engine.loaded:
            engine = LocalEngine(name=name, path=path, device=self.device)
            self._load_engine(engine, on_event)
            self.engines[name] = engine
        previous = state.owner
        state = self.store.write(state, owner="local", local_models=self.resident(), ollama_models=[])
        if previous != "local":
            self._owner_changed(previous, "local", on_event)
        return state

    def acquire_external(
        self, *, owner: str, ollama_model: str | None = None, on_event: EventSink = _ignore
    ) -> GpuState:
        """Free the GPU of local models for `owner` ("ollama" or "openai")."""
        state = self.store.read()
        ollama_models = list(state.ollama_models)
        if ollama_model and ollama_model not in ollama_models:
            ollama_models.append(ollama_model)
        if state.owner == owner and not self.resident() and ollama_models == state.ollama_models:
            return state
        for engine in [e for e in self.engines.values() if e.loaded]:
            self._unload_engine(engine, on_event)
        previous = state.owner
        state = self.store.write(state, owner=owner, local_models=[], ollama_models=ollama_models)
        if previous != owner:
            self._owner_changed(previous, owner, on_event)
        return state

    # --- steps --------------------------------------------------------------

    def _load_engine(self, engine: LocalEngine, on_event: EventSink) -> None:
        on_event("loading_local", {"model": engine.name})
        before = memory_snapshot(self.device)
        started = time.perf_counter()
        engine.load()
        seconds = time.perf_counter() - started
        after = memory_snapshot(self.device)
        payload = self._event("local_load", model=engine.name, seconds=seconds, freed_bytes=0,
                              loaded_bytes=after["allocated"] - before["allocated"], before=before, after=after)
        on_event("loaded_local", payload)

    def _unload_engine(self, engine: LocalEngine, on_event: EventSink) -> None:
        on_event("unloading_local", {"model": engine.name})
        before = memory_snapshot(self.device)
        started = time.perf_counter()
        survivors = engine.unload()
        seconds = time.perf_counter() - started
        after = memory_snapshot(self.device)
        payload = self._event("local_unload", model=engine.name, seconds=seconds,
                              freed_bytes=before["allocated"] - after["allocated"],
                              before=before, after=after, survivors=survivors)
        self.engines.pop(engine.name, None)
        on_event("unloaded_local", payload)

    def _unload_ollama(self, ollama_urls: list[str], on_event: EventSink) -> None:
        for url in ollama_urls:
            on_event("unloading_ollama", {"endpoint": url})
            started = time.perf_counter()
            try:
                result = ollama_unload_all(url, timeout=settings.OLLAMA_UNLOAD_TIMEOUT,
                                           poll=settings.OLLAMA_UNLOAD_POLL)
            except OllamaUnavailable as exc:
                # A server that does not answer cannot be asked to unload; its
                # models are not ours to count. Say so and go on: failing here
                # would make a down Ollama block every local model.
                log.warning("GPU slot %s: cannot unload Ollama at %s: %s", self.slot, url, exc)
                on_event("ollama_unreachable", {"endpoint": url, "detail": str(exc)})
                continue
            if not result.models:
                continue
            payload = self._event("ollama_unload", model=",".join(result.models), seconds=result.seconds,
                                  freed_bytes=result.size_vram_freed, endpoint=url)
            on_event("unloaded_ollama", payload)
            log.info("GPU slot %s: Ollama unloaded %s (%d bytes of VRAM) in %.2f s", self.slot,
                     result.models, result.size_vram_freed, time.perf_counter() - started)

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
