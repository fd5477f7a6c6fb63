"""The scheduler's decisions (gpu_manager/scheduler.py), against the real
Redis, on slots of their own: admission (the fast path, the queue,
`gpu_busy`), the worker's picks (exhaustive visits, the gate, resident
models first, batch lines behind), and `fifo`. The state a pick reads is
written with the real GpuStateStore, as the GPU worker writes it; times are
Redis's own, so the tests move them by moving arrival scores back instead of
sleeping. tests/test_scheduling.py runs the same policy through the workers.
"""
from __future__ import annotations

import itertools
import time

import pytest

from chatsite.redis_client import redis_client
from gpu_manager.leases import Leases
from gpu_manager.scheduler import Policy, Scheduler
from gpu_manager.state import GpuStateStore

_slots = itertools.count()
GATE = 10.0  # the gate age A of these tests (floor; no switch measured yet)


@pytest.fixture
def slot(stack) -> str:
    name = f"test-sched-{next(_slots)}-{time.time_ns()}"
    yield name
    r = redis_client()
    r.delete(*r.keys(f"gpu:slot:{name}*"))


def sched(slot: str, **policy) -> Scheduler:
    return Scheduler(slot=slot, policy=Policy(**{"gate_floor": GATE, "max_wait": 10_000, **policy}))


def own(slot: str, owner: str, *, local: list[str] = (), ollama: list[str] = ()) -> None:
    store = GpuStateStore(slot=slot)
    store.write(store.read(), owner=owner, local_models=list(local), ollama_models=list(ollama))


def admit(s: Scheduler, message_id: int, owner: str, model: str = "m", *, batch: bool = False):
    return s.admit(message_id=message_id, owner=owner, model=model, batch=batch, lease_ttl=60)


def age(s: Scheduler, message_id: int, seconds: float) -> None:
    """Make a waiting request look `seconds` older than it is."""
    for key in s.wait_keys.values():
        score = redis_client().zscore(key, str(message_id))
        if score is not None:
            redis_client().zadd(key, {str(message_id): score - seconds})


def picks(s: Scheduler, n: int) -> list:
    out = []
    for _ in range(n):
        pick = s.next()
        out.append(pick.item.message_id if pick.kind == "serve" else pick.kind)
        if pick.switch:
            s.handover_done()
    return out


# --- admission -------------------------------------------------------------------

def test_an_ollama_request_while_ollama_owns_the_gpu_takes_its_lease_at_once(slot):
    own(slot, "ollama", ollama=["qwen:7b"])
    s = sched(slot)
    admission = admit(s, 1, "ollama", "qwen:7b")
    assert admission.kind == "fast"
    assert Leases(slot=slot).live() == ["1"]
    assert s.snapshot()["waiting"] == {"local": 0, "ollama": 0, "openai": 0}


@pytest.mark.parametrize("why", ["another model", "local resident", "handover", "fifo", "local owns"])
def test_no_fast_path_unless_the_owner_holds_the_gpu_for_that_model_and_nothing_is_handed_over(slot, why):
    own(slot, "local" if why == "local owns" else "ollama", ollama=["qwen:7b"],
        local=["demo"] if why in ("local resident", "local owns") else [])
    s = sched(slot, mode="fifo" if why == "fifo" else "grouped")
    if why == "handover":
        redis_client().hset(s.sched_key, "hold", "1")
    admission = admit(s, 1, "ollama", "llama3" if why == "another model" else "qwen:7b")
    assert admission.kind == "queued" and admission.position == 1
    assert Leases(slot=slot).live() == []


def test_once_the_gate_closes_no_lease_is_granted(slot):
    own(slot, "ollama", ollama=["qwen:7b"])
    s = sched(slot)
    admit(s, 1, "local", "demo")
    assert admit(s, 2, "ollama", "qwen:7b").kind == "fast"  # the gate is open: the visit goes on
    age(s, 1, GATE + 0.1)
    assert admit(s, 3, "ollama", "qwen:7b").kind == "queued"
    assert Leases(slot=slot).live() == ["2"]
    assert s.snapshot()["gate"]["closed"] is True


def test_a_projected_wait_over_the_bound_is_refused_and_changes_nothing(slot):
    own(slot, "ollama", ollama=["qwen:7b"])
    s = sched(slot, max_wait=5.0, serve_default=2.0)
    assert admit(s, 1, "ollama", "qwen:7b").kind == "fast"  # Ollama generates: about 2 s left
    s.observe("switch:local", 6.0)                          # and a switch back costs 6 s
    before = redis_client().hgetall(s.sched_key)
    admission = admit(s, 2, "local", "demo")
    assert admission.kind == "busy" and admission.eta == 8.0 and admission.owner == "ollama"
    assert s.snapshot()["waiting"] == {"local": 0, "ollama": 0, "openai": 0}
    assert redis_client().hgetall(s.sched_key) == before and not redis_client().exists(s.items_key)


def test_the_estimate_counts_the_queue_ahead(slot):
    own(slot, "local", local=["demo"])
    s = sched(slot, serve_default=2.0)
    etas = [admit(s, i, "local", "demo").eta for i in range(1, 4)]
    assert etas == [0.0, 2.0, 4.0]
    assert admit(s, 9, "ollama", "qwen:7b").eta >= 6.0  # the local visit (cut at the gate) comes first


# --- the worker's picks ----------------------------------------------------------------

def test_the_current_owner_is_served_until_its_queue_is_empty_then_the_other_in_arrival_order(slot):
    own(slot, "local", local=["demo"])
    s = sched(slot)
    for i, owner in enumerate(["ollama", "local", "ollama", "local", "local", "ollama"], start=1):
        admit(s, i, owner, "demo" if owner == "local" else "qwen:7b")
    first = s.next()
    assert (first.item.message_id, first.switch) == (2, False)
    assert picks(s, 2) == [4, 5]
    switch = s.next()
    assert (switch.item.message_id, switch.switch) == (1, True)
    assert s.snapshot()["gate"]["handover"] is True
    s.handover_done()
    own(slot, "ollama", ollama=["qwen:7b"])
    assert picks(s, 3) == [3, 6, "idle"]


def test_when_the_gate_closes_only_the_work_that_came_before_it_is_finished(slot):
    own(slot, "local", local=["demo"])
    s = sched(slot)
    admit(s, 1, "local", "demo")
    admit(s, 2, "ollama", "qwen:7b")
    admit(s, 3, "local", "demo")
    age(s, 1, GATE + 5)
    age(s, 2, GATE + 1)   # its gate closed 1 s ago ...
    age(s, 3, 0.5)        # ... and this one came after that
    assert picks(s, 1) == [1]
    pick = s.next()
    assert (pick.item.message_id, pick.switch) == (2, True)


def test_ollama_visit_waits_for_its_generations_while_the_gate_is_open_then_hands_over(slot):
    own(slot, "ollama", ollama=["qwen:7b"])
    s = sched(slot)
    assert admit(s, 1, "ollama", "qwen:7b").kind == "fast"  # a generation in flight
    admit(s, 2, "local", "demo")
    assert s.next().kind == "wait"
    Leases(slot=slot).release(1)
    pick = s.next()
    assert (pick.item.message_id, pick.switch) == (2, True)
    # From the hand-over on, an Ollama request waits in line: no lease.
    assert admit(s, 3, "ollama", "qwen:7b").kind == "queued"
    assert Leases(slot=slot).live() == []


def test_a_closed_gate_ends_ollamas_visit_even_with_generations_in_flight(slot):
    own(slot, "ollama", ollama=["qwen:7b"])
    s = sched(slot)
    admit(s, 1, "ollama", "qwen:7b")
    admit(s, 2, "local", "demo")
    age(s, 2, GATE + 0.1)
    pick = s.next()
    # The worker takes it, and waits for the lease in prepare_local (I1).
    assert (pick.item.message_id, pick.switch) == (2, True)
    assert Leases(slot=slot).live() == ["1"]


def test_resident_models_first_within_a_visit_but_never_past_one_that_waited_the_gate(slot):
    own(slot, "local", local=["hot"])
    s = sched(slot)
    admit(s, 1, "local", "cold")
    admit(s, 2, "local", "hot")
    admit(s, 3, "local", "hot")
    assert picks(s, 2) == [2, 3]
    admit(s, 4, "local", "hot")
    age(s, 1, GATE + 1)
    assert picks(s, 2) == [1, 4]


def test_batch_lines_go_after_interactive_work_and_age_into_equals(slot):
    own(slot, "local", local=["demo"])
    s = sched(slot, batch_delay=30.0)
    admit(s, 1, "local", "demo", batch=True)
    admit(s, 2, "local", "demo")
    admit(s, 3, "local", "demo", batch=True)
    age(s, 3, 31)
    admit(s, 4, "local", "demo")
    # 3 waited longer than the batch delay: it ranks as if it came 1 s ago,
    # before the interactive ones; 1, fresh, ranks 30 s behind them.
    assert picks(s, 4) == [3, 2, 4, 1]


def test_fifo_serves_in_arrival_order_whoever_owns_the_gpu(slot):
    own(slot, "local", local=["demo"])
    s = sched(slot, mode="fifo")
    for i, owner in enumerate(["ollama", "local", "ollama", "local"], start=1):
        admit(s, i, owner, "demo" if owner == "local" else "qwen:7b")
    assert picks(s, 5) == [1, 2, 3, 4, "idle"]


def test_a_worker_restart_clears_a_hand_over_its_predecessor_left(slot):
    own(slot, "ollama", ollama=["qwen:7b"])
    s = sched(slot)
    admit(s, 1, "local", "demo")
    assert s.next().switch  # the worker dies here, mid-switch
    s.repair()
    assert s.snapshot()["gate"]["handover"] is False
    assert admit(s, 2, "ollama", "qwen:7b").kind == "fast"


def test_the_gate_age_follows_the_measured_switch_cost(slot):
    s = sched(slot, gate_floor=2.0, gate_factor=4.0)
    assert s.snapshot()["gate"]["age_seconds"] == 2.0
    s.observe("switch:local", 3.0)      # Ollama unloaded, the local model loaded
    s.observe("switch:external", 0.5)   # the local model unloaded ...
    s.observe("load:ollama", 1.5)       # ... and Ollama's own load
    snapshot = s.snapshot()
    assert snapshot["switch_seconds"] == 2.5
    assert snapshot["gate"]["age_seconds"] == 10.0
    assert snapshot["totals"]["switch:local:total"] == 3.0


def test_a_visit_lingers_a_fraction_of_a_switch_for_its_owners_next_request(slot):
    """A closed-loop user's next request comes a round trip after its reply:
    the GPU waits for it (a quarter of a switch) instead of switching twice."""
    own(slot, "local", local=["demo"])
    s = sched(slot, linger_factor=0.25)
    s.observe("switch:local", 40.0)        # a switch costs 40 s: linger 10 s (a quarter; A: 160 s)
    admit(s, 1, "local", "demo")
    assert picks(s, 1) == [1]
    s.observe("serve:local", 1.0)          # its reply ended just now
    admit(s, 2, "ollama", "qwen:7b")
    assert s.next().kind == "wait"         # the local user may send again
    admit(s, 3, "local", "demo")
    assert picks(s, 1) == [3]              # it did: no switch
    redis_client().hset(s.sched_key, "active:local", time.time() - 11)
    pick = s.next()                        # it did not, for longer than the linger
    assert (pick.item.message_id, pick.switch) == (2, True)


def test_no_linger_once_the_gate_closed(slot):
    own(slot, "local", local=["demo"])
    s = sched(slot, linger_factor=0.25)
    s.observe("switch:local", 40.0)
    s.observe("serve:local", 1.0)
    admit(s, 2, "ollama", "qwen:7b")
    age(s, 2, 4 * 40.0 + 1)                # A = 4 x the switch cost
    assert s.next().switch


def test_a_visit_lasts_the_gate_age_even_when_the_other_side_waited_through_the_last_one(slot):
    """Requests that waited through the last visit have waited A already when
    this one begins: its gate still stays open A from its start (else each
    visit serves one request and hands back)."""
    own(slot, "local", local=["demo"])
    s = sched(slot)
    for i, owner in enumerate(["ollama", "ollama", "local", "local"], start=1):
        admit(s, i, owner, "demo" if owner == "local" else "qwen:7b")
    age(s, 1, GATE + 5)
    age(s, 2, GATE + 5)
    age(s, 3, GATE + 5)     # the local ones waited longer than A, through Ollama's visit
    age(s, 4, GATE + 4)
    first = s.next()
    assert (first.item.message_id, first.switch) == (3, False)   # local owns: oldest first
    assert s.next().item.message_id == 4
    pick = s.next()
    assert (pick.item.message_id, pick.switch) == (1, True)
    s.handover_done()                       # Ollama's visit begins now
    own(slot, "ollama", ollama=["qwen:7b"])
    admit(s, 5, "local", "demo")
    age(s, 5, GATE + 1)                     # local has waited A already ...
    assert picks(s, 1) == [2]               # ... yet Ollama's queue is served
    assert s.snapshot()["gate"]["closed"] is False
    redis_client().hset(s.sched_key, "visit", time.time() - GATE - 1)
    pick = s.next()                         # A after the visit began: the gate closes
    assert (pick.item.message_id, pick.switch) == (5, True)


def test_a_batch_line_is_never_refused_for_a_long_wait(slot):
    own(slot, "ollama", ollama=["qwen:7b"])
    s = sched(slot, max_wait=5.0, serve_default=2.0)
    admit(s, 1, "ollama", "qwen:7b")
    s.observe("switch:local", 6.0)
    assert admit(s, 2, "local", "demo").kind == "busy"
    line = admit(s, 3, "local", "demo", batch=True)
    assert line.kind == "queued" and line.eta > 5.0


def test_a_load_that_several_requests_waited_for_is_counted_once(slot):
    s = sched(slot)
    for _ in range(5):                      # five requests waited for one 6 s load
        s.observe("load:ollama", 6.0)
    assert s.snapshot()["totals"]["load:ollama:total"] == 6.0


def test_requests_that_no_queued_task_would_serve_get_a_wake_up(slot):
    """A task that ended before its pick leaves a request with no task to
    serve it: the GPU worker's housekeeping queues a wake-up, once, after
    seeing the shortage on two ticks in a row (one look can fall between an
    admission's wait entry and its task)."""
    from chatsite.celery import app
    from chatsite.queues import gpu_queue
    from workers.lifecycle import SchedulerWaker

    s = Scheduler(slot=slot)
    waker = SchedulerWaker(app=app, slot=slot)
    own(slot, "local", local=["demo"])
    assert not waker.tick(busy=False)    # nothing waits
    admit(s, 1, "local", "demo")
    assert not waker.tick(busy=True)     # a running task asks again
    assert not waker.tick(busy=False)    # short once: not yet
    assert not waker.tick(busy=True)     # the shortage must be seen twice in a row
    try:
        assert not waker.tick(busy=False)
        assert waker.tick(busy=False)
        assert redis_client().llen(gpu_queue(slot)) == 1
        assert not waker.tick(busy=False)  # one is queued already
        assert not waker.tick(busy=False)
    finally:
        redis_client().delete(gpu_queue(slot))
