"""The GPU manager in this process, against the real Redis and the fake
Ollama, on a slot of its own (slot "0" belongs to the real GPU worker)."""
import gc
import threading
import time
import weakref

import pytest

from gpu_manager.engines import EngineLoadError, LocalEngine
from gpu_manager.leases import LeaseKeeper, LeaseLost
from gpu_manager.manager import GpuManager
from gpu_manager import memory
from gpu_manager.memory import memory_snapshot
from gpu_manager.selfcheck import model_build
from gpu_manager.state import LocalSpec
from tests.support.waiting import wait_for
from tests.support.gpu import manager_on_slot

SLOT = "test-manager"
#: 50 load/unload cycles may grow RSS by at most this much: well under one
#: copy of the 24 MB model used below, so a leaked model fails the test.
CYCLE_GROWTH_BOUND = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def model_24mb(tmp_path_factory):
    return str(model_build(tmp_path_factory.mktemp("m") / "model", nbytes=24 << 20))


@pytest.fixture
def manager(stack):
    with manager_on_slot(SLOT) as mgr:
        yield mgr


def kinds(mgr: GpuManager) -> list[tuple[str, str]]:
    return [(e["kind"], e["model"]) for e in mgr.store.events(1000)]


@pytest.mark.slow
def test_fifty_load_unload_cycles_do_not_grow_memory(model_24mb):
    engine = LocalEngine(name="m", path=model_24mb, device="cpu")
    after = []
    for _ in range(50):
        engine.load()
        engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=2, temperature=0, top_p=1,
                        on_text=lambda t: None, should_stop=lambda: False)
        assert engine.unload() == {}  # weakrefs to model and tokenizer are dead
        reading = memory_snapshot("cpu")
        after.append(reading["rss_anon"] + reading["rss_file"])
    # The first cycle imports and warms up; growth is measured from there.
    assert after[-1] - after[0] < CYCLE_GROWTH_BOUND, [a - after[0] for a in after[::10]]


def test_a_survivor_is_reported_with_its_holder(model_24mb):
    engine = LocalEngine(name="m", path=model_24mb, device="cpu")
    engine.load()
    keeper = {"oops": engine.tokenizer}
    survivors = engine.unload()
    assert list(survivors) == ["m.tokenizer"] and any("oops" in h for h in survivors["m.tokenizer"])
    del keeper


def test_weights_held_by_a_reference_cycle_are_collected(model_24mb, monkeypatch):
    engine = LocalEngine(name="m", path=model_24mb, device="cpu")
    engine.load()
    weights = [weakref.ref(t) for t in engine.model.parameters()]
    layer = engine.model.model.layers[0]
    layer.__dict__["loop"] = [layer]  # the model is freed at once, this layer only by the collector
    del layer
    collections, collect = [], gc.collect
    monkeypatch.setattr(memory.gc, "collect", lambda: collections.append(collect()))
    assert engine.unload() == {}
    assert collections and all(ref() is None for ref in weights)
    # Without a cycle nothing needs the full collection (0.15–0.2 s a switch).
    engine.load()
    collections.clear()
    assert engine.unload() == {} and collections == []


def test_weights_that_outlive_their_model_are_reported(model_24mb):
    engine = LocalEngine(name="m", path=model_24mb, device="cpu")
    engine.load()
    kept = {"stray": engine.model.model.embed_tokens.weight}
    survivors = engine.unload()
    assert list(survivors) == ["m.weights"], survivors
    assert survivors["m.weights"][0].startswith("1 of ") and any("stray" in h for h in survivors["m.weights"])
    del kept


def test_external_owner_unloads_every_engine_and_preloads_come_back(manager, demo_model, model_24mb):
    manager.prepare_local(spec=LocalSpec("a", model_24mb))
    manager.prepare_local(spec=LocalSpec("b", demo_model.path))
    assert manager.resident() == ["a", "b"]
    manager.acquire_external(owner="openai")
    assert manager.resident() == [] and manager.store.read().owner == "openai"
    unloads = [m for k, m in kinds(manager) if k == "local_unload"]
    assert sorted(unloads) == ["a", "b"]
    # On return the requested model loads, plus the ones marked "preload".
    manager.prepare_local(spec=LocalSpec("b", demo_model.path), preload=[LocalSpec("a", model_24mb)])
    assert manager.resident() == ["a", "b"]
    assert manager.store.read().local_models == ["a", "b"]


def test_budget_evicts_the_least_recently_used_engine(manager, demo_model, model_24mb):
    manager.budget_bytes = 30 << 20  # room for one 24 MB model and the tiny demo, not two big ones
    manager.prepare_local(spec=LocalSpec("tiny", demo_model.path))
    manager.prepare_local(spec=LocalSpec("big1", model_24mb))
    manager.prepare_local(spec=LocalSpec("tiny", demo_model.path))  # big1 is now the least recently used
    manager.prepare_local(spec=LocalSpec("big2", model_24mb))
    assert manager.resident() == ["big2", "tiny"]
    evicted = [e for e in manager.store.events(1000) if e["kind"] == "local_unload"]
    assert [(e["model"], e["reason"]) for e in evicted] == [("big1", "budget")]
    # A model larger than the whole budget is refused before anything is evicted.
    manager.budget_bytes = 1 << 20
    with pytest.raises(EngineLoadError, match="budget"):
        manager.prepare_local(spec=LocalSpec("big3", model_24mb))
    assert manager.resident() == ["big2", "tiny"]


def test_idle_engines_follow_their_keep_alive(manager, demo_model):
    manager.prepare_local(spec=LocalSpec("quick", demo_model.path, keep_alive=0.3))
    manager.prepare_local(spec=LocalSpec("forever", demo_model.path, keep_alive=0))
    assert manager.idle_engines() == []
    wait_for(lambda: manager.idle_engines() == ["quick"], timeout=5, what="keep-alive to pass")
    manager.unload_local(names=manager.idle_engines(), reason="idle")
    assert manager.resident() == ["forever"]
    assert manager.store.events(1)[-1]["kind"] in ("local_unload", "owner_change")


def test_warm_offload_keeps_the_weights_and_comes_back_as_a_copy(manager, model_24mb):
    spec = LocalSpec("warm", model_24mb, warm_offload=True)
    manager.prepare_local(spec=spec)
    engine = manager.engines["warm"]
    manager.acquire_external(owner="openai")
    assert manager.resident() == [] and engine.offloaded and engine.model is not None
    manager.prepare_local(spec=spec)
    load = [e for e in manager.store.events(1000) if e["kind"] == "local_load"][-1]
    assert load["warm"] is True and manager.engines["warm"] is engine and engine.loaded


def test_local_waits_for_the_ollama_lease_before_unloading_ollama(manager, demo_model, stack):
    stack.ollama.load("qwen:7b")
    manager.acquire_external(owner="ollama", holder="m1", ollama_model="qwen:7b")
    released_at = []

    def generation() -> None:
        with LeaseKeeper(manager.leases, "m1", ttl=1.0):
            time.sleep(0.5)  # the generation streams for a while (simulated)
        released_at.append(time.time())

    thread = threading.Thread(target=generation)
    thread.start()
    manager.prepare_local(spec=LocalSpec("local", demo_model.path), ollama_urls=[stack.ollama.url])
    thread.join()
    unload = [r for r in stack.ollama.requests_to("/api/generate") if r.body.get("keep_alive") == 0]
    assert unload and unload[0].at >= released_at[0]
    assert manager.store.read().owner == "local" and stack.ollama.loaded_models() == []


def test_an_expired_lease_is_reaped_and_cannot_be_renewed(manager):
    expired = []
    manager.on_leases_expired = expired.extend
    manager.leases.grant("m2", ttl=0.2)
    wait_for(lambda: manager.reap_leases() or expired, timeout=5, what="lease expiry")
    assert expired == ["m2"]
    with pytest.raises(LeaseLost):
        manager.leases.renew("m2", ttl=5)


def test_a_stale_writer_cannot_overwrite_a_newer_state(manager):
    from gpu_manager.state import StaleState

    first = manager.store.read()
    manager.store.write(first, owner="openai")
    with pytest.raises(StaleState):
        manager.store.write(first, owner="ollama")
    assert manager.store.read().owner == "openai"
