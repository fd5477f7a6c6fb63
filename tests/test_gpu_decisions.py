"""The GPU manager's decisions (gpu_manager/manager.py), in this process on
the CPU with the generated demo model, against the real Redis and the fake
Ollama, on a slot of its own (slot "0" belongs to the real GPU worker): what
it loads, unloads and writes for each request, and what it leaves alone.
tests/test_gpu_manager.py has the engines' memory, the budget, keep-alive,
warm offload and the leases."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
from django.conf import settings

from chatsite.redis_client import redis_client
from gpu_manager.demo_model import demo_model_create
from gpu_manager.manager import GpuManager, LeaseWaitTimeout
from gpu_manager.state import LocalSpec
from tests.support.gpu import manager_on_slot

SLOT = "test-decisions"


@pytest.fixture(scope="module")
def demo_path() -> str:
    """The demo model that `make run` generates (the run's private var/)."""
    return str(demo_model_create(path=settings.DEMO_MODEL_DIR))


@pytest.fixture
def manager(stack):
    with manager_on_slot(SLOT) as mgr:
        yield mgr


class Phases(list):
    """An `on_event` sink: the phases the manager reported, in order."""

    def __call__(self, phase: str, payload: dict) -> None:
        self.append(phase)


def kinds(mgr: GpuManager) -> list[tuple[str, str]]:
    return [(e["kind"], e["model"]) for e in mgr.store.events(1000)]


def test_a_local_model_is_loaded_and_the_gpu_becomes_the_local_models(manager, demo_path):
    phases = Phases()
    state = manager.prepare_local(spec=LocalSpec("demo", demo_path), on_event=phases)
    assert (state.owner, state.local_models, state.ollama_models) == ("local", ["demo"], [])
    assert manager.store.read() == state and manager.resident() == ["demo"]
    assert phases == ["loading_local", "loaded_local", "owner"]
    assert kinds(manager) == [("local_load", "demo"), ("owner_change", "local")]


def test_nothing_is_reloaded_or_written_when_the_model_is_resident(manager, demo_path):
    manager.prepare_local(spec=LocalSpec("demo", demo_path))
    engine, before, events = manager.engines["demo"], manager.store.read(), manager.store.events(1000)
    phases = Phases()
    state = manager.prepare_local(spec=LocalSpec("demo", demo_path, keep_alive=30.0), on_event=phases)
    assert state == before and manager.store.read().epoch == before.epoch  # no Redis write
    assert manager.store.events(1000) == events and phases == []
    assert manager.engines["demo"] is engine and engine.loaded
    assert engine.keep_alive == 30.0  # the admin's edit, taken at the model's next use


def test_a_changed_path_reloads_the_model(manager, demo_path, tmp_path):
    manager.prepare_local(spec=LocalSpec("demo", demo_path))
    old = manager.engines["demo"]
    moved = str(shutil.copytree(demo_path, tmp_path / "moved"))
    manager.prepare_local(spec=LocalSpec("demo", moved))
    assert manager.engines["demo"] is not old and not old.loaded and manager.engines["demo"].path == moved
    unload = [e for e in manager.store.events(1000) if e["kind"] == "local_unload"]
    assert [(e["model"], e["reason"]) for e in unload] == [("demo", "path_changed")]


def test_unloading_frees_the_engine_and_the_state_says_so(manager, demo_path):
    manager.prepare_local(spec=LocalSpec("a", demo_path))
    manager.prepare_local(spec=LocalSpec("b", demo_path))
    engine = manager.engines["a"]
    # One of two: the local models keep the GPU.
    assert manager.unload_local(names=["a"], reason="admin") == ["a"]
    assert not engine.loaded and engine.model is None and "a" not in manager.engines
    state = manager.store.read()
    assert (state.owner, state.local_models) == ("local", ["b"])
    # The last one: nobody owns the GPU.
    phases = Phases()
    assert manager.unload_local(reason="idle", on_event=phases) == ["b"]
    state = manager.store.read()
    assert (state.owner, state.local_models, manager.resident()) == ("none", [], [])
    assert phases == ["unloading_local", "unloaded_local", "owner"]
    unloads = [(e["model"], e["reason"]) for e in manager.store.events(1000) if e["kind"] == "local_unload"]
    assert unloads == [("a", "admin"), ("b", "idle")]
    # Nothing resident: nothing to do, nothing written.
    epoch = state.epoch
    assert manager.unload_local(reason="idle") == [] and manager.store.read().epoch == epoch


def test_ollama_gets_the_gpu_only_after_the_local_models_are_unloaded(manager, demo_path):
    manager.prepare_local(spec=LocalSpec("demo", demo_path))
    engine = manager.engines["demo"]
    phases = Phases()
    state = manager.acquire_external(owner="ollama", holder=41, ollama_model="qwen:7b", on_event=phases)
    assert (state.owner, state.local_models, state.ollama_models) == ("ollama", [], ["qwen:7b"])
    assert manager.store.read() == state and manager.resident() == [] and not engine.loaded
    # The unload is done, and recorded, before the owner changes.
    assert phases == ["unloading_local", "unloaded_local", "owner"]
    assert kinds(manager)[-2:] == [("local_unload", "demo"), ("owner_change", "ollama")]
    # The message that asked holds a lease until its generation ends.
    assert manager.leases.live() == ["41"]


def test_ollama_already_owning_the_gpu_is_not_switched_again(manager):
    manager.acquire_external(owner="ollama", holder=1, ollama_model="qwen:7b")
    before, events = manager.store.read(), manager.store.events(1000)
    phases = Phases()
    state = manager.acquire_external(owner="ollama", holder=2, ollama_model="qwen:7b", on_event=phases)
    assert state == before and manager.store.events(1000) == events and phases == []
    assert sorted(manager.leases.live()) == ["1", "2"]  # each generation holds its own lease
    # Another Ollama model is one more to unload later: written, owner unchanged.
    state = manager.acquire_external(owner="ollama", ollama_model="llama3:8b")
    assert state.ollama_models == ["qwen:7b", "llama3:8b"] and state.epoch == before.epoch + 1
    assert [e["kind"] for e in manager.store.events(1000)] == [e["kind"] for e in events]


def test_a_local_model_unloads_ollama_first_and_clears_its_models(manager, demo_path, stack):
    stack.ollama.load("qwen:7b")
    manager.acquire_external(owner="ollama", ollama_model="qwen:7b")
    phases = Phases()
    state = manager.prepare_local(spec=LocalSpec("demo", demo_path), ollama_urls=[stack.ollama.url],
                                  on_event=phases)
    assert (state.owner, state.local_models, state.ollama_models) == ("local", ["demo"], [])
    assert stack.ollama.loaded_models() == []
    assert [r.body["model"] for r in stack.ollama.requests_to("/api/generate") if r.body.get("keep_alive") == 0] \
        == ["qwen:7b"]
    assert phases == ["unloading_ollama", "unloaded_ollama", "loading_local", "loaded_local", "owner"]
    assert [e["kind"] for e in manager.store.events(1000)][-3:] == ["ollama_unload", "local_load", "owner_change"]


def test_a_down_ollama_does_not_block_a_local_model(manager, demo_path, stack):
    manager.acquire_external(owner="ollama", ollama_model="qwen:7b")
    url = stack.ollama.url
    stack.ollama.stop()  # fakes_reset starts it again for the next test
    phases = Phases()
    state = manager.prepare_local(spec=LocalSpec("demo", demo_path), ollama_urls=[url], on_event=phases)
    assert (state.owner, state.local_models, state.ollama_models) == ("local", ["demo"], [])
    assert phases[0] == "unloading_ollama" and "ollama_unreachable" in phases
    unreachable = [e for e in manager.store.events(1000) if e["kind"] == "ollama_unreachable"]
    assert len(unreachable) == 1 and unreachable[0]["endpoint"] == url


def test_a_local_model_that_cannot_wait_for_ollama_changes_nothing(manager, demo_path, stack):
    manager.timings = dataclasses.replace(manager.timings, lease_wait_timeout=0.3, lease_poll=0.02)
    manager.acquire_external(owner="ollama", holder=7, ollama_model="qwen:7b")
    before = manager.store.read()
    with pytest.raises(LeaseWaitTimeout) as caught:
        manager.prepare_local(spec=LocalSpec("demo", demo_path), ollama_urls=[stack.ollama.url])
    assert caught.value.code == "gpu_busy"
    assert manager.store.read() == before and manager.resident() == []
    assert stack.ollama.requests_to("/api/generate") == []  # Ollama was not asked to unload


def test_the_state_is_repaired_from_what_the_worker_holds(manager, demo_path):
    manager.prepare_local(spec=LocalSpec("demo", demo_path))
    # Redis came back empty: the state says nobody owns the GPU.
    redis_client().delete(f"gpu:slot:{SLOT}")
    state = manager.state_sync(note="test")
    assert (state.owner, state.local_models) == ("local", ["demo"])
    # A state that agrees is left as it is.
    assert manager.state_sync(note="test").epoch == state.epoch
    # A worker that stops cleanly takes its models out of the state.
    manager.forget()
    state = manager.store.read()
    assert (state.owner, state.local_models) == ("none", [])


def test_a_restarted_worker_drops_the_models_of_its_predecessor(manager):
    # The state a worker that died left: local models it no longer holds.
    manager.store.write(manager.store.read(), owner="local", local_models=["ghost"])
    state = manager.repair()
    assert (state.owner, state.local_models) == ("none", [])
    # With Ollama the owner, only the local models are dropped.
    manager.store.write(manager.store.read(), owner="ollama", local_models=["ghost"], ollama_models=["qwen:7b"])
    state = manager.repair()
    assert (state.owner, state.local_models, state.ollama_models) == ("ollama", [], ["qwen:7b"])
