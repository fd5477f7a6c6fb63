"""Which owner gets a GPU next: the switch-aware scheduler of one GPU slot.

A switch between the local models and Ollama costs seconds on a real GPU
(a 7B load, and Ollama's memory coming back after an unload), so serving
requests in arrival order turns mixed traffic into a switching loop. The
scheduler groups requests by owner, and bounds how long any of them waits
(docs/gpu-arbitration.md, "Scheduling", has the policy, the proof that I1
still holds, and the wait bound):

- the current owner's waiting work is served until there is none
  (exhaustive), models already resident first;
- once another owner's oldest request has waited the gate age A (and the
  visit has lasted A), the gate closes: the current owner finishes only the work that arrived before
  then, Ollama gets no new lease, and the GPU switches once;
- A = max(GPU_GATE_FLOOR_SECONDS, GPU_GATE_FACTOR x the switch cost), the
  cost a moving average of the switches measured on this slot;
- a visit whose owner's queue ran empty lingers up to one switch's cost
  after its last request ended (GPU_LINGER_FACTOR; anticipatory
  scheduling, ski rental): a user whose next message follows its reply
  soon keeps the GPU;
- an external message whose owner holds the GPU while the gate is open
  takes its lease at admission and goes straight to a CPU worker (`admit`
  returns "fast");
- an interactive request whose projected wait exceeds GPU_MAX_WAIT_SECONDS
  is refused at once (`gpu_busy`) instead of waiting silently (a batch line
  is not: its batch paces it, and a batch may take hours);
- batch lines rank GPU_BATCH_DELAY_SECONDS behind interactive messages:
  interactive work goes first within a visit, and a batch line that waited
  that long competes as an equal, so it never starves.

`fifo` (GPU_SCHEDULE=fifo) serves in arrival order with no fast path: the
behaviour before the scheduler, kept so that the two can be measured side by
side (bench/switch_load.py).

The order lives in Redis and changes only inside Lua scripts, which Redis
runs atomically: admission and the worker's choice never interleave, and
the fast path's lease is granted in the same step that checks the owner, so
it cannot slip in after the GPU worker decided to hand the GPU over (the
`hold` flag; the epoch of the state fences the worker's own writes). The GPU
queue carries one task per admitted request, and a task serves whichever
request the scheduler picks when it runs: the queue counts the work, Redis
orders it.

Keys, per slot S:
  gpu:slot:S:wait:<owner>  zset  message id -> rank (arrival time, + the batch delay)
  gpu:slot:S:items         hash  message id -> JSON {owner, model, arrived, batch}
  gpu:slot:S:sched         hash  hold (the GPU is being handed over), visit (when the
                                 current owner's visit began), active:<owner> (when its
                                 last request ended), and the moving averages and
                                 totals of switch and service seconds
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from chatsite.redis_client import redis_client

OWNERS = ("local", "ollama", "openai")
POLICIES = ("grouped", "fifo")
#: Weight of a new sample in a moving average.
EWMA_WEIGHT = 0.3

# Shared by the scripts: KEYS = state, leases, sched, items, wait:local,
# wait:ollama, wait:openai. ARGV[1..6] = policy, gate floor, gate factor,
# the client's time (lease scores are client times, gpu_manager/leases.py),
# the service seconds assumed before any was measured, the linger factor.
_COMMON = """
local OWNERS = {'local', 'ollama', 'openai'}
local WAIT = {['local'] = KEYS[5], ['ollama'] = KEYS[6], ['openai'] = KEYS[7]}
local policy, floor, factor = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local client_now, serve_default, linger_factor = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
-- Redis's clock, read once and only when a decision needs it: the fast
-- path (nobody waits) never does, and TIME is a command too.
local now_cached = nil
local function clock()
  if not now_cached then
    local t = redis.call('TIME')
    now_cached = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return now_cached
end

-- Every figure and flag the decisions read, and the state's fields, each
-- read once (one HMGET each: a script's commands count in Redis's work).
local SCHED = {}
local FIELDS = {'switch:local', 'switch:external', 'load:ollama', 'visit', 'hold',
                'serve:local', 'serve:ollama', 'serve:openai', 'active:local', 'active:ollama', 'active:openai'}
local values = redis.call('HMGET', KEYS[3], unpack(FIELDS))
for i, name in ipairs(FIELDS) do SCHED[name] = values[i] end
local STATE = redis.call('HMGET', KEYS[1], 'owner', 'local_models', 'ollama_models')

local function num(field, default)
  local v = SCHED[field]
  if v then return tonumber(v) end
  return default
end
-- The cost of one switch: the mean of the two directions' moving averages
-- (to local: Ollama unloaded and the model loaded; to Ollama: local engines
-- unloaded and Ollama's own load, which the CPU worker reports).
local function switch_cost()
  local to_local = num('switch:local', nil)
  local to_ollama = num('switch:external', nil)
  if to_ollama then to_ollama = to_ollama + num('load:ollama', 0) end
  if to_local and to_ollama then return (to_local + to_ollama) / 2 end
  return to_local or to_ollama or 0
end
local A = math.max(floor, factor * switch_cost())
-- Each owner's oldest waiting request, read once (the scripts change the
-- queues only in their last step).
-- One EXISTS first: mostly nobody waits (the fast path), and then no ZRANGE.
local HEADS = {}
local anyone = redis.call('EXISTS', KEYS[5], KEYS[6], KEYS[7]) > 0
for _, o in ipairs(OWNERS) do
  if anyone then HEADS[o] = redis.call('ZRANGE', WAIT[o], 0, 0, 'WITHSCORES') else HEADS[o] = {} end
end
local function head(o)
  local h = HEADS[o]
  if #h == 0 then return nil, nil end
  return tonumber(h[2]), h[1]
end
local function state_owner()
  return STATE[1] or 'none'
end
local function state_models(field)
  return cjson.decode((field == 'local_models' and STATE[2] or STATE[3]) or '[]')
end
-- When the gate of the current owner's visit closes (nil: nobody else
-- waits): once another owner's oldest request has waited A, but never
-- less than A after the visit began. A request that waited through the
-- last visit has waited A already when this one starts; without the
-- second term the visit would serve one request and hand back: a
-- switch per request, the loop the gate is there to break.
local function gate_time(cur)
  local g = nil
  for _, o in ipairs(OWNERS) do
    if o ~= cur then
      local s = head(o)
      if s and (g == nil or s + A < g) then g = s + A end
    end
  end
  if g then g = math.max(g, num('visit', 0) + A) end
  return g
end
local function live_leases()
  return redis.call('ZCOUNT', KEYS[2], client_now, '+inf')
end
local function serve_seconds(o)
  return num('serve:' .. o, serve_default)
end
"""

# ARGV[7..] = message id, owner, model, batch (0/1), batch delay, max wait,
# lease TTL. Returns {kind, position, eta (string), current owner}.
_ADMIT = _COMMON + """
local id, owner, model = ARGV[7], ARGV[8], ARGV[9]
local batch, batch_delay = tonumber(ARGV[10]), tonumber(ARGV[11])
local max_wait, lease_ttl = tonumber(ARGV[12]), tonumber(ARGV[13])
local cur = state_owner()
local hold = SCHED['hold']
local g = gate_time(cur)
local gate_open = (g == nil) or clock() < g
local S = switch_cost()

if policy == 'grouped' and owner ~= 'local' and owner == cur and not hold and gate_open
   and #HEADS[owner] == 0 then
  local fast = true
  if owner == 'ollama' then
    local locals = state_models('local_models')
    local models = state_models('ollama_models')
    local listed = false
    for _, m in ipairs(models) do if m == model then listed = true end end
    fast = listed and #locals == 0
    if fast then redis.call('ZADD', KEYS[2], client_now + lease_ttl, id) end
  end
  if fast then return {'fast', 0, '0', cur} end
end

-- The projected wait: what is ahead of this request in its own owner's
-- queue, and, when another owner holds the GPU, the rest of that owner's
-- visit (cut at the gate), the owners whose turn comes first, and a switch.
local function work(o)
  local w = redis.call('ZCARD', WAIT[o]) * serve_seconds(o)
  if o == 'ollama' and live_leases() > 0 then w = w + serve_seconds(o) end
  return w
end
local ahead = redis.call('ZCARD', WAIT[owner]) * serve_seconds(owner)
local eta = ahead
if policy == 'fifo' then
  for _, o in ipairs(OWNERS) do
    if o ~= owner then
      local w = work(o)
      if w > 0 then eta = eta + w + S end
    end
  end
  if cur ~= owner and eta == ahead then eta = eta + S end
elseif owner ~= cur or hold or not gate_open then
  local mine = head(owner) or clock()
  local left = math.max(0, mine + A - clock())
  if WAIT[cur] then eta = eta + math.min(work(cur), left + serve_seconds(cur)) end
  for _, o in ipairs(OWNERS) do
    local s = head(o)
    if o ~= owner and o ~= cur and s and s < mine then eta = eta + S + math.min(work(o), A) end
  end
  if owner ~= cur then eta = eta + S end
end
local position = redis.call('ZCARD', WAIT[owner]) + 1
if policy == 'fifo' then
  position = 1
  for _, o in ipairs(OWNERS) do position = position + redis.call('ZCARD', WAIT[o]) end
end
-- A batch line is never refused: its batch paces it, and it may take hours.
if eta > max_wait and batch == 0 then return {'busy', position, tostring(eta), cur} end
redis.call('ZADD', WAIT[owner], clock() + batch * batch_delay, id)
redis.call('HSET', KEYS[4], id, cjson.encode({owner = owner, model = model, arrived = clock(), batch = batch}))
return {'queued', position, tostring(eta), cur}
"""

# Returns {'serve', id, item JSON, switch (0/1)}, {'wait', seconds} or {'idle'}.
_NEXT = _COMMON + """
local cur = state_owner()

local function take(o, id, switch)
  redis.call('ZREM', WAIT[o], id)
  local item = redis.call('HGET', KEYS[4], id) or cjson.encode({owner = o, model = '', arrived = clock(), batch = 0})
  redis.call('HDEL', KEYS[4], id)
  if switch == 1 then redis.call('HSET', KEYS[3], 'hold', '1') end
  return {'serve', id, item, switch}
end

local function resident(o)
  local set = {}
  for _, m in ipairs(state_models((o == 'local') and 'local_models' or 'ollama_models')) do set[m] = true end
  return set
end

if policy == 'fifo' then
  local best, best_id, best_owner = nil, nil, nil
  for _, o in ipairs(OWNERS) do
    local s, id = head(o)
    if s and (best == nil or s < best) then best, best_id, best_owner = s, id, o end
  end
  if best == nil then return {'idle'} end
  return take(best_owner, best_id, (best_owner ~= cur) and 1 or 0)
end

local g = gate_time(cur)
local closed = g ~= nil and clock() >= g
if WAIT[cur] and not (cur == 'ollama' and closed) then
  -- The current owner's visit goes on: its work that arrived before the
  -- gate closed (all of it while the gate is open), resident models first,
  -- but never past a request of its own that waited A (a cold model is
  -- not starved by a hot one).
  local upto = closed and ('(' .. g) or '+inf'
  local ids = redis.call('ZRANGEBYSCORE', WAIT[cur], '-inf', upto, 'WITHSCORES', 'LIMIT', 0, 64)
  if #ids > 0 then
    if #ids > 2 and clock() - tonumber(ids[2]) < A then
      local hot, names = resident(cur), {}
      for i = 1, #ids, 2 do names[#names + 1] = ids[i] end
      local items = redis.call('HMGET', KEYS[4], unpack(names))
      for i, raw in ipairs(items) do
        if raw and hot[cjson.decode(raw).model] then return take(cur, names[i], 0) end
      end
    end
    return take(cur, ids[1], 0)
  end
end

-- The current owner has no (admissible) waiting work: the visit ends, but
-- Ollama's generations in flight are its work too, and while the gate is
-- open new ones may join them; wait for them to end or for the gate. And
-- while the gate is open, linger a little after the owner's last request
-- ended (a fraction of a switch): a user, or a batch, whose next request
-- follows its last reply within a round trip keeps the GPU instead of
-- paying two switches (anticipatory scheduling).
local best, best_id, best_owner = nil, nil, nil
for _, o in ipairs(OWNERS) do
  if o ~= cur then
    local s, id = head(o)
    if s and (best == nil or s < best) then best, best_id, best_owner = s, id, o end
  end
end
if best == nil then return {'idle'} end
if not closed then
  if cur == 'ollama' and live_leases() > 0 then return {'wait', tostring(g - clock())} end
  local active = num('active:' .. cur, nil)
  local linger = math.min(A, linger_factor * switch_cost())
  if active and clock() - active < linger then return {'wait', tostring(active + linger - clock())} end
end
return take(best_owner, best_id, 1)
"""

# ARGV = field, seconds, weight. A moving average, its total and its count;
# a request's end (`serve:<owner>`) also marks when its owner was last
# active. Requests that waited for the same Ollama load each report it: a
# load that ended less than its own length after the last one counted is
# that one again, and is not counted twice.
_OBSERVE = """
local f, w = ARGV[1], tonumber(ARGV[2])
local kind, owner = string.match(f, '^(%a+):(%a+)$')
local got = redis.call('HMGET', KEYS[1], f, f .. ':total', f .. ':count', 'loaded:' .. owner)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v, total, count, loaded = tonumber(got[1]), tonumber(got[2]) or 0, tonumber(got[3]) or 0, tonumber(got[4])
local taken = 0
for i = 3, #ARGV do
  local x = tonumber(ARGV[i])
  -- Replies that waited on the same Ollama load each report it: once.
  if not (kind == 'load' and loaded and now - loaded < x) then
    if v then v = v * (1 - w) + x * w else v = x end
    total, count, taken = total + x, count + 1, taken + 1
    if kind == 'load' then loaded = now end
  end
end
if taken == 0 then return got[1] end
local fields = {f, tostring(v), f .. ':total', tostring(total), f .. ':count', tostring(count)}
if kind == 'serve' then fields[#fields + 1] = 'active:' .. owner; fields[#fields + 1] = tostring(now) end
if kind == 'load' then fields[#fields + 1] = 'loaded:' .. owner; fields[#fields + 1] = tostring(now) end
redis.call('HSET', KEYS[1], unpack(fields))
return tostring(v)
"""


_HANDOVER_DONE = """
local t = redis.call('TIME')
redis.call('HDEL', KEYS[1], 'hold')
redis.call('HSET', KEYS[1], 'visit', tostring(tonumber(t[1]) + tonumber(t[2]) / 1000000))
"""


@dataclass(frozen=True)
class Policy:
    """The scheduler's settings (chatsite/settings.py says what each means)."""

    mode: str = "grouped"
    gate_floor: float = 2.0
    gate_factor: float = 4.0
    batch_delay: float = 30.0
    max_wait: float = 900.0
    #: Service seconds assumed for an owner before one was measured.
    serve_default: float = 2.0
    #: A visit whose owner's queue ran empty lingers this fraction of a
    #: switch after its last request ended, for the next one.
    linger_factor: float = 1.0

    def __post_init__(self):
        if self.mode not in POLICIES:
            raise ValueError(f"GPU_SCHEDULE must be one of {POLICIES}, not {self.mode!r}")

    @classmethod
    def from_settings(cls) -> "Policy":
        from django.conf import settings  # read once, where the scheduler is built
        return cls(mode=settings.GPU_SCHEDULE, gate_floor=settings.GPU_GATE_FLOOR_SECONDS,
                   gate_factor=settings.GPU_GATE_FACTOR, batch_delay=settings.GPU_BATCH_DELAY_SECONDS,
                   max_wait=settings.GPU_MAX_WAIT_SECONDS, linger_factor=settings.GPU_LINGER_FACTOR)


@dataclass(frozen=True)
class Admission:
    #: "fast" (leased, or no GPU step needed: straight to a CPU worker),
    #: "queued" (waits for the GPU worker) or "busy" (refused, nothing changed).
    kind: str
    position: int
    eta: float
    #: The GPU's owner when the request came.
    owner: str
    #: The owner the request asked for.
    requested: str = ""

    @property
    def waits(self) -> bool:
        """Queued behind someone: another owner holds the GPU, or requests
        of its own owner are ahead."""
        return self.kind == "queued" and (self.owner != self.requested or self.position > 1)


@dataclass(frozen=True)
class Item:
    message_id: int
    owner: str
    model: str
    arrived: float
    batch: bool


@dataclass(frozen=True)
class Pick:
    #: "serve" (`item`), "wait" (Ollama's visit goes on; ask again) or "idle".
    kind: str
    item: Item | None = None
    #: The GPU changes owner for this item (the `hold` is set until
    #: `handover_done`).
    switch: bool = False


# Grant a GPU lease only while Ollama holds the GPU: owner ollama, no local
# engine resident, and no hand-over under way (the `hold`, set in the very
# script that picks a switch). The fast path's conditions (_ADMIT), checked
# as atomically, so I1 holds by its argument (docs/gpu-arbitration.md): a
# lease granted before the hold is waited for by the GPU worker, none is
# granted after. KEYS: state, sched, leases; ARGV: holder, expiry (Unix time).
_LEASE_IF_OLLAMA = """
local state = redis.call('HMGET', KEYS[1], 'owner', 'local_models')
if state[1] ~= 'ollama' then return 0 end
if #cjson.decode(state[2] or '[]') > 0 then return 0 end
if redis.call('HEXISTS', KEYS[2], 'hold') == 1 then return 0 end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""


class Scheduler:
    def __init__(self, *, slot: str, policy: Policy = Policy()):
        self.slot = slot
        self.policy = policy
        base = f"gpu:slot:{slot}"
        self.sched_key = f"{base}:sched"
        self.items_key = f"{base}:items"
        self.wait_keys = {owner: f"{base}:wait:{owner}" for owner in OWNERS}
        self._keys = [base, f"{base}:leases", self.sched_key, self.items_key,
                      *(self.wait_keys[o] for o in OWNERS)]
        self._redis = redis_client()
        self._admit = self._redis.register_script(_ADMIT)
        self._next = self._redis.register_script(_NEXT)
        self._observe = self._redis.register_script(_OBSERVE)
        self._handover_done = self._redis.register_script(_HANDOVER_DONE)
        self._lease_if_ollama = self._redis.register_script(_LEASE_IF_OLLAMA)

    def lease_if_ollama(self, holder: int, *, ttl: float) -> bool:
        """A GPU lease for Ollama work that is no queued reply (an
        embeddings call, chat/embeddings.py), granted only while Ollama
        holds the GPU as the fast path requires: False otherwise, and the
        caller keeps off the GPU. `holder`: negative, so that an expired
        lease names no reply to fail (workers/lifecycle.py replies_fail_lost)."""
        keys = [self._keys[0], self.sched_key, self._keys[1]]
        return bool(self._lease_if_ollama(keys=keys, args=[holder, time.time() + ttl]))

    def _common(self) -> list:
        p = self.policy
        return [p.mode, p.gate_floor, p.gate_factor, time.time(), p.serve_default, p.linger_factor]

    def admit(self, *, message_id: int, owner: str, model: str, batch: bool, lease_ttl: float) -> Admission:
        """Admit a request for the GPU: a lease at once (external owner that
        holds the GPU), a place in its owner's queue, or a refusal."""
        if owner not in OWNERS:
            raise ValueError(f"unknown GPU owner {owner!r}")
        kind, position, eta, current = self._admit(
            keys=self._keys,
            args=[*self._common(), message_id, owner, model, int(batch), self.policy.batch_delay,
                  self.policy.max_wait, lease_ttl])
        return Admission(kind=kind, position=int(position), eta=float(eta), owner=current, requested=owner)

    def next(self) -> Pick:
        """The GPU worker's next request, taken off its queue."""
        answer = self._next(keys=self._keys, args=self._common())
        if answer[0] != "serve":
            return Pick(kind=answer[0])
        item = json.loads(answer[2])
        return Pick(kind="serve", switch=bool(answer[3]),
                    item=Item(message_id=int(answer[1]), owner=item["owner"], model=item["model"],
                              arrived=float(item["arrived"]), batch=bool(item["batch"])))

    def handover_done(self) -> None:
        """The switch the last pick asked for ended (or failed): the new
        owner's visit begins, and the fast path may grant leases again,
        under whatever owner the state now names."""
        self._handover_done(keys=[self.sched_key])

    def observe(self, what: str, seconds: float) -> float:
        """Feed a measured duration: `switch:local`, `switch:external` (a
        switch's seconds on the GPU worker, to the local models or away from
        them), `load:ollama` (Ollama's own load, reported by its reply) or
        `serve:<owner>` (a request's service)."""
        return self.observe_many(what, [seconds])

    def observe_many(self, what: str, values: list[float]) -> float:
        """`observe` for several durations of one kind, in order, in one
        script (`ObservationBuffer`). Returns the moving average."""
        return float(self._observe(keys=[self.sched_key], args=[what, EWMA_WEIGHT, *values]) or values[-1])

    def forget(self, message_id: int) -> None:
        """Drop a request that will not be served (its dispatch failed)."""
        pipe = self._redis.pipeline()
        for key in self.wait_keys.values():
            pipe.zrem(key, str(message_id))
        pipe.hdel(self.items_key, str(message_id))
        pipe.execute()

    def snapshot(self) -> dict:
        """What /api/gpu/ and /metrics show: each owner's waiting count and
        oldest wait, the gate, the switch-cost estimate, the moving averages
        (`averages`) and the totals and counts since the slot began."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(self.sched_key)
        pipe.hget(f"gpu:slot:{self.slot}", "owner")
        for key in self.wait_keys.values():
            pipe.zcard(key)
            pipe.zrange(key, 0, 0, withscores=True)
        (seconds, micros), raw, owner, *queues = pipe.execute()
        now = seconds + micros / 1e6
        owner = owner or "none"
        waiting, oldest = {}, {}
        for i, who in enumerate(self.wait_keys):
            waiting[who] = queues[2 * i]
            head = queues[2 * i + 1]
            oldest[who] = round(max(0.0, now - head[0][1]), 3) if head else None
        averages = {k: float(v) for k, v in raw.items()
                    if k.count(":") == 1 and k.split(":")[0] in ("switch", "load", "serve")}
        visit = float(raw.get("visit", 0.0))
        totals = {k: float(v) for k, v in raw.items() if k.count(":") == 2}
        cost = switch_cost(averages)
        gate_age = max(self.policy.gate_floor, self.policy.gate_factor * cost)
        # The gate bounds a visit: only while an owner holds the GPU and
        # another waits (under fifo there is none).
        others = [age for who, age in oldest.items() if who != owner and age is not None]
        closes_in = (max(gate_age - max(others), visit + gate_age - now))\
            if others and owner in OWNERS and self.policy.mode == "grouped" else None
        return {
            "policy": self.policy.mode,
            "waiting": waiting,
            "oldest_wait_seconds": oldest,
            "gate": {"age_seconds": round(gate_age, 3), "handover": "hold" in raw,
                     "closed": closes_in is not None and closes_in <= 0,
                     "closes_in_seconds": None if closes_in is None else round(max(0.0, closes_in), 3)},
            "switch_seconds": round(cost, 3),
            "max_wait_seconds": self.policy.max_wait,
            "averages": averages,
            "totals": totals,
        }

    def repair(self) -> None:
        """At GPU worker start: a predecessor that died mid-switch left the
        hand-over flag set; this worker holds nothing, so none is under way."""
        self._redis.hdel(self.sched_key, "hold")


def slot_scheduler(slot: str) -> Scheduler:
    """The scheduler of a GPU slot under this deployment's settings (one per
    slot and policy, so that its scripts are registered once)."""
    return _scheduler(slot, Policy.from_settings())


@functools.cache
def _scheduler(slot: str, policy: Policy) -> Scheduler:
    return Scheduler(slot=slot, policy=policy)


class ObservationBuffer:
    """Durations one process measured, sent to their slot's scheduler
    together every `period` seconds by a daemon thread (a greenlet under
    gevent): one script per kind and period instead of one per reply (the
    CPU worker's `serve:ollama` for every Ollama reply: docs/BENCHMARKS.md,
    "Redis commands per message"). The scheduler sees an Ollama reply's
    service at most `period` late, a small part of the switch the linger
    and the gate are measured in. A failed send is kept for the next."""

    def __init__(self, *, period: float):
        self.period = period
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], list[float]] = defaultdict(list)
        self._thread: threading.Thread | None = None

    def add(self, *, slot: str, what: str, seconds: float) -> None:
        with self._lock:
            self._pending[slot, what].append(seconds)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="scheduler-observations", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.period)
            try:
                self.flush()
            except Exception:
                logging.getLogger(__name__).warning("could not send observations; retrying", exc_info=True)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(list)
        for i, ((slot, what), values) in enumerate(pending.items()):
            try:
                slot_scheduler(slot).observe_many(what, values)
            except Exception:
                with self._lock:  # this one and the rest, before what came since
                    for item, kept in list(pending.items())[i:]:
                        self._pending[item][:0] = kept
                raise


def switch_cost(stats: dict[str, float]) -> float:
    """The switch-cost estimate from the moving averages (as in the scripts)."""
    to_local = stats.get("switch:local")
    to_ollama = stats.get("switch:external")
    if to_ollama is not None:
        to_ollama += stats.get("load:ollama", 0.0)
    if to_local is not None and to_ollama is not None:
        return (to_local + to_ollama) / 2
    return to_local if to_local is not None else (to_ollama or 0.0)


