"""What people see of the GPU scheduler (issue 13): each slot's queue, gate
and switch-cost estimate in /api/gpu/, and its waits, switch seconds and
waiting requests in /metrics. Requests are put into a slot's scheduler
directly, against the suite's Redis: no worker takes them."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chat import metrics
from chat.metrics import gpu_wait_observe
from chatsite.redis_client import redis_client
from gpu_manager.scheduler import Policy, Scheduler
from gpu_manager.state import GpuStateStore

#: A slot of this module's own: slot "0" belongs to the real GPU worker.
SLOT = "sched-view"


@pytest.fixture
def slot():
    """A slot the local models own, with a measured switch cost of 1 s (so
    the gate age is 4 x 1 s); removed afterwards."""
    store = GpuStateStore(slot=SLOT)
    store.write(store.read(), owner="local", local_models=["local_demo"])
    scheduler = Scheduler(slot=SLOT, policy=Policy())
    scheduler.observe("switch:local", 1.5)
    scheduler.observe("switch:external", 0.5)
    yield scheduler
    r = redis_client()
    base = f"gpu:slot:{SLOT}"
    r.delete(base, f"{base}:events", f"{base}:memory", scheduler.sched_key, scheduler.items_key,
             *scheduler.wait_keys.values(), f"{metrics.KEY}:gpu-wait:{SLOT}:local")
    r.srem("gpu:slots", SLOT)


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


def admit(scheduler: Scheduler, message_id: int, owner: str) -> str:
    model = "local_demo" if owner == "local" else "qwen:7b"
    return scheduler.admit(message_id=message_id, owner=owner, model=model, batch=False, lease_ttl=60).kind


def scheduler_shown(client) -> dict:
    slots = {s["slot"]: s for s in client.get("/api/gpu/").json()["slots"]}
    return slots[SLOT]["scheduler"]


def test_gpu_api_shows_who_waits_the_gate_and_the_switch_cost(logged_in, slot):
    assert [admit(slot, i, "local") for i in (1, 2, 3)] == ["queued"] * 3
    assert admit(slot, 4, "ollama") == "queued"

    shown = scheduler_shown(logged_in)
    assert shown["policy"] == "grouped"
    assert shown["waiting"] == {"local": 3, "ollama": 1, "openai": 0}
    assert shown["oldest_wait_seconds"]["openai"] is None
    assert shown["oldest_wait_seconds"]["ollama"] >= 0
    assert shown["switch_seconds"] == 1.0
    # Ollama's request has waited almost nothing of the gate age A = 4 x 1 s.
    gate = shown["gate"]
    assert (gate["age_seconds"], gate["closed"], gate["handover"]) == (4.0, False, False)
    assert 0 < gate["closes_in_seconds"] <= 4.0
    assert shown["max_wait_seconds"] == 900.0
    assert shown["totals"]["switch:local:count"] == 1

    # The local models' visit goes on while the gate is open; once their
    # queue is empty, the next pick hands the GPU over to Ollama.
    picks = [slot.next() for _ in range(4)]
    assert [(p.item.owner, p.switch) for p in picks] == [("local", False)] * 3 + [("ollama", True)]
    shown = scheduler_shown(logged_in)
    assert shown["waiting"] == {"local": 0, "ollama": 0, "openai": 0}
    assert shown["gate"]["handover"] is True and shown["gate"]["closes_in_seconds"] is None
    slot.handover_done()
    assert scheduler_shown(logged_in)["gate"]["handover"] is False


def test_gpu_api_shows_the_gate_closed_once_the_other_side_waited_its_age(logged_in, slot, settings):
    # A gate age of 0 (no floor, no measured cost): it closes as soon as
    # another owner waits, with no need to wait for a clock in the test.
    settings.GPU_GATE_FLOOR_SECONDS = 0.0
    settings.GPU_GATE_FACTOR = 0.0
    admit(slot, 1, "local")
    assert scheduler_shown(logged_in)["gate"]["closes_in_seconds"] is None  # nobody else waits

    admit(slot, 2, "ollama")
    gate = scheduler_shown(logged_in)["gate"]
    assert (gate["age_seconds"], gate["closed"], gate["closes_in_seconds"]) == (0.0, True, 0.0)


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_show_gpu_waits_switch_seconds_and_waiting_requests(client, slot, db):
    gpu_wait_observe(slot=SLOT, owner="local", seconds=0.3)
    gpu_wait_observe(slot=SLOT, owner="local", seconds=7.0)
    admit(slot, 1, "local")
    admit(slot, 2, "ollama")
    admit(slot, 3, "ollama")

    response = client.get("/metrics")
    assert response.status_code == 200
    found = samples(response.content.decode())
    labels = (("owner", "local"), ("slot", SLOT))
    assert found[("gpu_wait_seconds_bucket", (("le", "0.25"), *labels))] == 0
    assert found[("gpu_wait_seconds_bucket", (("le", "0.5"), *labels))] == 1
    assert found[("gpu_wait_seconds_bucket", (("le", "10.0"), *labels))] == 2
    assert found[("gpu_wait_seconds_bucket", (("le", "+Inf"), *labels))] == 2
    assert found[("gpu_wait_seconds_count", labels)] == 2
    assert found[("gpu_wait_seconds_sum", labels)] == pytest.approx(7.3)
    assert found[("gpu_switch_seconds_total", (("part", "switch_local"), ("slot", SLOT)))] == 1.5
    assert found[("gpu_switch_seconds_total", (("part", "switch_external"), ("slot", SLOT)))] == 0.5
    assert found[("gpu_switch_seconds_total", (("part", "load_ollama"), ("slot", SLOT)))] == 0.0
    assert found[("gpu_waiting_requests", (("owner", "local"), ("slot", SLOT)))] == 1
    assert found[("gpu_waiting_requests", (("owner", "ollama"), ("slot", SLOT)))] == 2
    assert found[("gpu_waiting_requests", (("owner", "openai"), ("slot", SLOT)))] == 0
