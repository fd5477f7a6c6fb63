"""Prometheus metrics for `/metrics`.

The service runs as several processes (web, GPU worker, CPU workers, on
several machines), so the counts live in Redis: each process adds to
counters and histogram buckets there, and a scrape reads them back,
together with what Redis and the GPU state already know (queue depth,
resident models, device memory). Any web process answers for all of them.

A process adds up its own observations for up to METRICS_FLUSH_SECONDS and
writes the sums in one pipeline (`_Tally`): one HINCRBY per changed field
per flush instead of seven commands per reply (docs/BENCHMARKS.md, "Redis
commands per message"). Nothing is dropped: a flush that fails is kept for
the next, and the last one runs at exit; a scrape first writes its own
process's pending counts.
"""
from __future__ import annotations

import atexit
import logging
import threading
from collections import defaultdict

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from chat.selectors import slots_known
from chatsite import queues
from chatsite.redis_client import redis_client
from gpu_manager.scheduler import slot_scheduler
from gpu_manager.state import GpuStateStore

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the latency buckets: from a cached local reply's
#: first token (tens of ms) to a cold model switch (tens of seconds).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Stages of a reply, each measured from the moment it was queued.
STAGES = ("started", "first_token", "finished")
#: Histograms keep one count per bucket (not cumulative): the keys moved
#: from "metrics" when they did, so that old cumulative counts are not read
#: as per-bucket ones (Prometheus takes the reset of a counter in its stride).
KEY = "metrics:v2"


class _Tally:
    """This process's observations not yet in Redis: (key, field) -> sum.
    Written by a daemon thread every METRICS_FLUSH_SECONDS (a greenlet
    under gevent), at exit, and before a scrape in this process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = defaultdict(int)
        self._sums: dict[tuple[str, str], float] = defaultdict(float)
        self._flusher: threading.Thread | None = None

    def count(self, key: str, field: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key, field] += n
            self._start()

    def add(self, key: str, field: str, value: float) -> None:
        with self._lock:
            self._sums[key, field] += value
            self._start()

    def _start(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._run, name="metrics-flush", daemon=True)
            self._flusher.start()
            atexit.register(self.flush)

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(settings.METRICS_FLUSH_SECONDS):
            try:
                self.flush()
            except Exception:  # kept for the next flush
                log.warning("could not write the metrics to Redis; retrying", exc_info=True)

    def flush(self) -> None:
        with self._lock:
            counts, sums = self._counts, self._sums
            self._counts, self._sums = defaultdict(int), defaultdict(float)
        if not counts and not sums:
            return
        try:
            pipe = redis_client().pipeline(transaction=False)
            for (key, field), n in counts.items():
                pipe.hincrby(key, field, n)
            for (key, field), value in sums.items():
                pipe.hincrbyfloat(key, field, value)
            pipe.execute()
        except Exception:
            # Not written (a pipeline without MULTI may have written part:
            # Redis was down, so most likely none): kept for the next flush.
            with self._lock:
                for item, n in counts.items():
                    self._counts[item] += n
                for item, value in sums.items():
                    self._sums[item] += value
            raise


_tally = _Tally()


def metrics_flush() -> None:
    """Write this process's pending observations now."""
    _tally.flush()


def gpu_wait_observe(*, slot: str, owner: str, seconds: float) -> None:
    """Record how long a request waited for its GPU, from admission until the
    GPU was ready for it (the fast path counts as no wait)."""
    _histogram_add(f"{KEY}:gpu-wait:{slot}:{owner}", seconds)


def _histogram_add(key: str, value: float) -> None:
    """One observation: its own bucket only (the first bound it is under),
    and the sum; the scrape adds the buckets up into Prometheus's cumulative
    form (`_buckets`)."""
    bound = next((str(b) for b in BUCKETS if value <= b), "+Inf")
    _tally.count(key, bound)
    _tally.add(key, "sum", value)


def message_observe(*, kind: str, status: str, seconds: dict[str, float]) -> None:
    """Record one ended reply: its status, and the seconds from queued to
    each stage it reached (keys of STAGES)."""
    _tally.count(f"{KEY}:messages", f"{kind}|{status}")
    for stage, value in seconds.items():
        _histogram_add(f"{KEY}:latency:{stage}:{kind}", value)


class ServiceCollector(Collector):
    def collect(self):
        metrics_flush()  # this process's own observations too, not a flush late
        r = redis_client()
        queues = GaugeMetricFamily("chat_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"])
        for queue in _queue_names():
            # kombu keeps each priority step of a queue in its own list
            # ("<queue>\x06\x16<step>"); the depth is their sum.
            lists = [queue, *r.scan_iter(match=f"{queue}\x06\x16*")]
            queues.add_metric([queue], sum(r.llen(name) for name in lists))
        yield queues

        ended = CounterMetricFamily("chat_messages", "Replies ended, by model kind and status.",
                                    labels=["kind", "status"])
        for field, count in r.hgetall(f"{KEY}:messages").items():
            kind, status = field.split("|", 1)
            ended.add_metric([kind, status], int(count))
        yield ended

        for stage in STAGES:
            family = HistogramMetricFamily(f"chat_reply_{stage}_seconds",
                                           f"Seconds from queued to {stage.replace('_', ' ')}.", labels=["kind"])
            for key in r.scan_iter(match=f"{KEY}:latency:{stage}:*"):
                family.add_metric([key.rsplit(":", 1)[1]], *_buckets(r.hgetall(key)))
            yield family

        waits = HistogramMetricFamily("gpu_wait_seconds", "Seconds a request waited for its GPU, by owner.",
                                      labels=["slot", "owner"])
        for key in r.scan_iter(match=f"{KEY}:gpu-wait:*"):
            slot, owner = key.removeprefix(f"{KEY}:gpu-wait:").rsplit(":", 1)
            waits.add_metric([slot, owner], *_buckets(r.hgetall(key)))
        yield waits

        transitions = CounterMetricFamily("gpu_transitions", "GPU transitions by kind.", labels=["slot", "kind"])
        freed = CounterMetricFamily("gpu_freed_bytes", "Bytes freed by unloads.", labels=["slot", "kind"])
        resident = GaugeMetricFamily("gpu_resident_models", "Models resident now.", labels=["slot", "side", "model"])
        memory = GaugeMetricFamily("gpu_memory_bytes", "The GPU worker's last memory reading.",
                                   labels=["slot", "device", "figure"])
        owner = GaugeMetricFamily("gpu_owner", "1 for the slot's current owner.", labels=["slot", "owner"])
        # The share of time spent switching is rate(gpu_switch_seconds_total).
        switching = CounterMetricFamily("gpu_switch_seconds", "Seconds spent switching the GPU's owner, by "
                                        "direction (to local, to external, Ollama's own loads).",
                                        labels=["slot", "part"])
        waiting = GaugeMetricFamily("gpu_waiting_requests", "Requests waiting for the GPU, by owner.",
                                    labels=["slot", "owner"])
        for slot in slots_known():
            sched = slot_scheduler(slot).snapshot()
            for part in ("switch:local", "switch:external", "load:ollama"):
                switching.add_metric([slot, part.replace(":", "_")], sched["totals"].get(f"{part}:total", 0.0))
            for who, count in sched["waiting"].items():
                waiting.add_metric([slot, who], count)
            store = GpuStateStore(slot=slot)
            for field, value in store.counters().items():
                what, kind = field.split(":", 1)
                (transitions if what == "count" else freed).add_metric([slot, kind], float(value))
            state = store.read()
            owner.add_metric([slot, state.owner], 1)
            for model in state.local_models:
                resident.add_metric([slot, "local", model], 1)
            for model in state.ollama_models:
                resident.add_metric([slot, "ollama", model], 1)
            reading = store.memory()
            for figure in ("allocated", "reserved", "free", "total"):
                memory.add_metric([slot, reading["device"], figure], reading[figure])
        yield from (transitions, freed, resident, memory, owner, switching, waiting)


def _buckets(raw: dict) -> tuple[list, float]:
    """Per-bucket counts (`_histogram_add`) as Prometheus's cumulative ones."""
    cumulative, running = [], 0
    for bound in [*map(str, BUCKETS), "+Inf"]:
        running += int(raw.get(bound, 0))
        cumulative.append((bound, running))
    return cumulative, float(raw.get("sum", 0))


def _queue_names() -> list[str]:
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()}
    per_gpu = {queues.gpu_queue(slot) for slot in slots_known()}
    return sorted(routed | per_gpu | {settings.CELERY_TASK_DEFAULT_QUEUE})


_registry = None


def metrics_view(request: HttpRequest) -> HttpResponse:
    """`GET /metrics` in Prometheus's text format. It names no user and no
    secret; keep it on the internal network all the same."""
    global _registry
    if _registry is None:
        _registry = CollectorRegistry(auto_describe=False)
        _registry.register(ServiceCollector())
    return HttpResponse(generate_latest(_registry), content_type=CONTENT_TYPE_LATEST)
