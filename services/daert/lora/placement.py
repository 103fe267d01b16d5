"""Which replica runs a request: adapter affinity over residency, popularity and in-flight
leases.

State: per replica, the adapters resident there (scored by their last use, so they list most
recently used first), the routes in flight there, each a lease that ends at ReleaseRoute or
at its expiry and names its adapter, and the adapters a route is loading there (vLLM), each
with the deadline of its load; across replicas, each adapter's popularity, a count of its
routes decayed with a half-life counted in routes (LRFU: half-life 0 makes it its last use,
i.e. plain LRU). "Load" is a replica's count of unexpired leases.

The rule, over the replicas that serve the request's base model:
  1. Base model (no adapter): the least loaded replica.
  2. A replica holding the adapter (the least loaded of them) unless it is overloaded: its
     load exceeds `spill_factor` x the mean load + `spill_margin`. Then the request spills
     to step 3, and the adapter becomes resident on a second replica.
  3. Cold start: among the replicas whose load is within `spill_margin` of the least loaded,
     one with a free slot, else the one whose least popular resident adapter is the least
     popular of all (then the less loaded). The adapter is loaded there and, beyond the
     replica's capacity, its least popular adapter is evicted. Choosing the victim across
     replicas keeps the churn of rarely used adapters in few slots.
Remaining ties go to the first replica in configuration order. Why popularity rather than
recency for evictions: one-off requests for rare adapters then replace each other instead of
pushing out adapters that are used all the time (bench/lora_router_bench.py measures both).

Leases play no part in choosing a victim: an adapter in use may be evicted. Where the router
unloads evicted adapters (vLLM), it waits until `evicted_state` says no lease on the replica
names the adapter any more: vLLM's unload only drops the name from the adapters it serves, so
requests already sent finish, but a route decided and not yet sent would fail. Meanwhile vLLM
serves more adapters than the slot's capacity, which costs it nothing: that list is unbounded
and the engine picks the weights on the GPU by its own LRU. If a cold start brings the
adapter back first, it is not unloaded at all.

A cold start on a replica whose adapters the router loads (vLLM) marks the adapter loading
there until the route that loads it reports the end (`finish_load`: a failure also takes the
residency back) or the load's deadline passes. A route for the adapter arriving meanwhile
learns it must wait (`Placement.loading`, then `load_state`); one arriving after the deadline
(its loader went away) loads it again.

With Redis, choosing and recording happen in one Lua script, so concurrent routes from
several router processes see each other's choices (two cold routes for an adapter cannot
both load it). Without Redis, or while it fails, the same rule runs on per-process state,
which mirrors every Redis decision so that it is warm when it takes over.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from daert.runtime.redis_state import RedisState

# The route id carries its replica, so ReleaseRoute needs no lookup: "<replica>/<token>".
ROUTE_ID_SEPARATOR = "/"

# An adapter on a replica: its load is under way, it is there, or it is not (its load failed).
LoadState = Literal["loading", "resident", "gone"]

# An adapter evicted from a replica: unload it (no lease there names it), wait (one does),
# or keep it (a cold start made it resident there again).
EvictedState = Literal["idle", "in_use", "resident"]


@dataclass(frozen=True)
class Slot:
    """The placement's view of one replica."""

    name: str
    capacity: int  # most adapters resident at once
    # Adapters always resident and never loaded or evicted here (TGI's LORA_ADAPTERS).
    pinned: tuple[str, ...] = ()
    # How long a load may take where the router loads adapters (vLLM); 0: the replica
    # loads them itself (LoRAX) or has them from its start (TGI).
    load_s: float = 0.0


@dataclass(frozen=True)
class Policy:
    spill_factor: float  # >= 1
    spill_margin: float
    popularity_half_life: int  # in routes; 0: evict the least recently used
    lease_s: float

    @property
    def decay(self) -> float:
        """Popularity grows by e^(use * decay) per route: ln 2 / half-life."""
        return math.log(2) / self.popularity_half_life if self.popularity_half_life else 0.0


@dataclass(frozen=True)
class Placement:
    replica: str
    route_id: str
    loaded: bool  # the adapter was not resident: a cold start on `replica`
    spilled: bool  # a replica held the adapter but was overloaded
    in_flight: int  # on `replica`, this route included
    evicted: tuple[str, ...] = ()  # adapters the cold start pushed out of `replica`
    # Resident, but another route's load of it there has not ended: wait for it.
    loading: bool = False


@dataclass
class ReplicaState:
    """Resident adapters (most recently used first) and unexpired leases of one replica."""

    resident: list[str] = field(default_factory=list)
    in_flight: int = 0


def split_route_id(route_id: str) -> tuple[str, str] | None:
    """(replica, token) of a route id made by `place`, or None if it is not one."""
    replica, separator, token = route_id.rpartition(ROUTE_ID_SEPARATOR)
    if not separator or not replica or len(token) != 32:
        return None
    return replica, token


def bump_popularity(old: float | None, use: int, decay: float) -> float:
    """An adapter's popularity after a route at `use`: log(sum of e^(use_i * decay)),
    kept in log space so it never overflows; with decay 0, simply the last use."""
    if not decay:
        return float(use)
    score = use * decay
    if old is None:
        return score
    high = max(old, score)
    return high + math.log(1 + math.exp(-abs(old - score)))


# Drops a replica's expired leases from its lease zset (token -> expiry) and lease hash
# (token -> adapter); both scripts that read leases start with it.
_PURGE_EXPIRED_LUA = """
local function purge_expired(leases_key, owners_key, now)
  for _, expired in ipairs(redis.call('ZRANGEBYSCORE', leases_key, '-inf', now)) do
    redis.call('HDEL', owners_key, expired)
  end
  redis.call('ZREMRANGEBYSCORE', leases_key, '-inf', now)
end
"""

# KEYS: per candidate (n each): its resident zset, lease zset (token -> expiry), lease hash
#       (token -> adapter) and loading hash (adapter -> "<deadline> <loader's token>"); then
#       the use counter and the popularity zset.
# ARGV: adapter ("" = base model), now_ms, lease_ms, token, spill_factor, spill_margin,
#       decay, then per candidate its capacity, 1 if the adapter is pinned there else 0, and
#       its load_ms (0: the router loads nothing there).
# Mirrors LocalPlacement.place step for step; tests check that the two agree.
_PLACE_LUA = (
    _PURGE_EXPIRED_LUA
    + """
local n = (#KEYS - 2) / 4
local uses_key, popularity_key = KEYS[4 * n + 1], KEYS[4 * n + 2]
local adapter, now, lease, token = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local factor, margin, decay = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local function resident_key(i) return KEYS[i] end
local function leases_key(i) return KEYS[n + i] end
local function owners_key(i) return KEYS[2 * n + i] end
local function loading_key(i) return KEYS[3 * n + i] end
local function capacity(i) return tonumber(ARGV[5 + 3 * i]) end
local function pinned(i) return ARGV[6 + 3 * i] == '1' end
local function load_ms(i) return tonumber(ARGV[7 + 3 * i]) end

local use = 0
if adapter ~= '' then
  use = redis.call('INCR', uses_key)
  local score = use
  if decay > 0 then
    score = use * decay
    local old = tonumber(redis.call('ZSCORE', popularity_key, adapter))
    if old then
      score = math.max(old, score) + math.log(1 + math.exp(-math.abs(old - score)))
    end
  end
  redis.call('ZADD', popularity_key, score, adapter)
end

-- The resident adapter of replica i, other than the one being placed, of lowest
-- popularity (the least recently used among equals), and its popularity.
local function victim(i)
  local best, best_score = nil, nil
  for _, member in ipairs(redis.call('ZRANGE', resident_key(i), 0, -1)) do
    if member ~= adapter then
      local s = tonumber(redis.call('ZSCORE', popularity_key, member)) or -math.huge
      if best_score == nil or s < best_score then best, best_score = member, s end
    end
  end
  return best, best_score
end

local loads, holds, total, min_load = {}, {}, 0, nil
for i = 1, n do
  purge_expired(leases_key(i), owners_key(i), now)
  loads[i] = redis.call('ZCARD', leases_key(i))
  total = total + loads[i]
  if min_load == nil or loads[i] < min_load then min_load = loads[i] end
  holds[i] = adapter ~= ''
    and (pinned(i) or redis.call('ZSCORE', resident_key(i), adapter) ~= false)
end
local holder = nil
for i = 1, n do
  if holds[i] and (holder == nil or loads[i] < loads[holder]) then holder = i end
end
local choice = nil
if holder ~= nil and loads[holder] <= factor * total / n + margin then
  choice = holder
elseif adapter == '' then
  for i = 1, n do
    if loads[i] == min_load then choice = i break end
  end
else
  local best_value = nil
  for i = 1, n do
    if loads[i] <= min_load + margin then
      local value = -math.huge
      if redis.call('ZCARD', resident_key(i)) >= capacity(i) then
        local _, s = victim(i)
        value = s
      end
      if best_value == nil or value < best_value
          or (value == best_value and loads[i] < loads[choice]) then
        choice, best_value = i, value
      end
    end
  end
end

redis.call('ZADD', leases_key(choice), now + lease, token)
local loaded, loading, evicted = adapter ~= '' and not holds[choice], 0, {}
if adapter ~= '' and not pinned(choice) then
  redis.call('HSET', owners_key(choice), token, adapter)
  redis.call('ZADD', resident_key(choice), use, adapter)
  while redis.call('ZCARD', resident_key(choice)) > capacity(choice) do
    local member = victim(choice)
    redis.call('ZREM', resident_key(choice), member)
    table.insert(evicted, member)
  end
  if load_ms(choice) > 0 then
    local marker = redis.call('HGET', loading_key(choice), adapter)
    if loaded or (marker and tonumber(string.match(marker, '^%d+')) <= now) then
      loaded = true
      redis.call('HSET', loading_key(choice), adapter,
                 string.format('%d %s', now + load_ms(choice), token))
    elseif marker then
      loading = 1
    end
  end
end
return {choice, loaded and 1 or 0, (holder ~= nil and choice ~= holder) and 1 or 0,
        loads[choice] + 1, evicted, redis.call('ZREVRANGE', resident_key(choice), 0, -1),
        loading}
"""
)

# KEYS: the replica's loading hash and resident zset. ARGV: adapter, the loader's token, 1
# when the load succeeded. Only the route whose load is marked ends it: after its deadline
# another route may have taken the load over.
_FINISH_LOAD_LUA = """
local marker = redis.call('HGET', KEYS[1], ARGV[1])
if not marker or string.match(marker, ' (%x+)$') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' then redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
"""

# KEYS: the replica's resident zset, lease zset and lease hash. ARGV: adapter, now_ms.
# Mirrors LocalPlacement.evicted_state.
_EVICTED_STATE_LUA = (
    _PURGE_EXPIRED_LUA
    + """
purge_expired(KEYS[2], KEYS[3], ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 'resident' end
for _, name in ipairs(redis.call('HVALS', KEYS[3])) do
  if name == ARGV[1] then return 'in_use' end
end
return 'idle'
"""
)


class LocalPlacement:
    """The placement rule on this process's own state: used without Redis and while Redis
    fails."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._resident: dict[str, dict[str, int]] = {}  # replica -> adapter -> last use
        # replica -> token -> (expiry in s, adapter; "" for none or a pinned one)
        self._leases: dict[str, dict[str, tuple[float, str]]] = {}
        # replica -> adapter -> (deadline in ms, as in Redis; the loading route's token)
        self._loading: dict[str, dict[str, tuple[int, str]]] = {}
        self._popularity: dict[str, float] = {}
        self._uses = 0

    def _live_leases(self, replica: str, now: float) -> dict[str, tuple[float, str]]:
        leases = self._leases.setdefault(replica, {})
        for token in [t for t, (expiry, _) in leases.items() if expiry <= now]:
            del leases[token]
        return leases

    def _use(self, adapter: str) -> int:
        self._uses += 1
        self._popularity[adapter] = bump_popularity(
            self._popularity.get(adapter), self._uses, self._policy.decay
        )
        return self._uses

    def _victim(self, replica: str, adapter: str) -> tuple[str, float]:
        resident = self._resident.get(replica, {})
        members = sorted((use, name) for name, use in resident.items() if name != adapter)
        popularity = [(self._popularity.get(name, -math.inf), name) for _, name in members]
        score, name = min(popularity, key=lambda pair: pair[0])  # min keeps the first of equals
        return name, score

    def place(self, candidates: Sequence[Slot], adapter: str, token: str, now: float) -> Placement:
        policy = self._policy
        use = self._use(adapter) if adapter else 0
        loads = [len(self._live_leases(slot.name, now)) for slot in candidates]
        min_load = min(loads)
        holds = [
            bool(adapter)
            and (adapter in slot.pinned or adapter in self._resident.get(slot.name, {}))
            for slot in candidates
        ]
        holders = [i for i, held in enumerate(holds) if held]
        holder = min(holders, key=lambda i: loads[i]) if holders else None
        limit = policy.spill_factor * sum(loads) / len(loads) + policy.spill_margin
        if holder is not None and loads[holder] <= limit:
            choice = holder
        elif not adapter:
            choice = loads.index(min_load)
        else:

            def victim_value(i: int) -> float:
                slot = candidates[i]
                if len(self._resident.get(slot.name, {})) < slot.capacity:
                    return -math.inf
                return self._victim(slot.name, adapter)[1]

            near = [i for i, load in enumerate(loads) if load <= min_load + policy.spill_margin]
            choice = min(near, key=lambda i: (victim_value(i), loads[i]))
        slot = candidates[choice]
        tracked = bool(adapter) and adapter not in slot.pinned
        self._leases.setdefault(slot.name, {})[token] = (
            now + policy.lease_s,
            adapter if tracked else "",
        )
        loaded, loading, evicted = bool(adapter) and not holds[choice], False, []
        if tracked:
            resident = self._resident.setdefault(slot.name, {})
            resident[adapter] = use
            while len(resident) > slot.capacity:
                name, _ = self._victim(slot.name, adapter)
                del resident[name]
                evicted.append(name)
            if slot.load_s:
                loaded, loading = self._mark_loading(slot, adapter, token, now, loaded)
        return Placement(
            replica=slot.name,
            route_id=slot.name + ROUTE_ID_SEPARATOR + token,
            loaded=loaded,
            spilled=holder is not None and choice != holder,
            in_flight=loads[choice] + 1,
            evicted=tuple(evicted),
            loading=loading,
        )

    def _mark_loading(
        self, slot: Slot, adapter: str, token: str, now: float, cold: bool
    ) -> tuple[bool, bool]:
        """(loaded, loading) of a route for `adapter` on `slot`: a cold start, or a route
        after a load's deadline (its route went away), loads it and is marked as loading."""
        markers = self._loading.setdefault(slot.name, {})
        marker = markers.get(adapter)
        now_ms = int(now * 1000)
        if cold or (marker is not None and marker[0] <= now_ms):
            markers[adapter] = (now_ms + int(slot.load_s * 1000), token)
            return True, False
        return False, marker is not None

    def mirror(
        self,
        replica: str,
        adapter: str,
        resident_mru_first: Sequence[str],
        token: str,
        expiry: float,
        loading_until_ms: int | None,
    ) -> None:
        """Take over a decision made in Redis: the use, the replica's resident set, the
        lease, and the load this route makes (`loading_until_ms`: its deadline)."""
        if adapter:
            self._use(adapter)
        # Last uses that keep Redis's order, the adapter just used being the latest.
        self._resident[replica] = {
            name: self._uses - rank for rank, name in enumerate(resident_mru_first)
        }
        tracked = adapter if adapter in self._resident[replica] else ""
        self._leases.setdefault(replica, {})[token] = (expiry, tracked)
        if loading_until_ms is not None:
            self._loading.setdefault(replica, {})[adapter] = (loading_until_ms, token)

    def release(self, replica: str, token: str, now: float) -> bool:
        expiry, _ = self._leases.get(replica, {}).pop(token, (None, ""))
        return expiry is not None and expiry > now

    def finish_load(self, replica: str, adapter: str, token: str, ok: bool) -> None:
        markers = self._loading.get(replica, {})
        if markers.get(adapter, (0, ""))[1] != token:
            return
        del markers[adapter]
        if not ok:
            self._resident.get(replica, {}).pop(adapter, None)

    def load_state(self, replica: str, adapter: str) -> LoadState:
        if adapter in self._loading.get(replica, {}):
            return "loading"
        return "resident" if adapter in self._resident.get(replica, {}) else "gone"

    def evicted_state(self, replica: str, adapter: str, now: float) -> EvictedState:
        if adapter in self._resident.get(replica, {}):
            return "resident"
        leases = self._live_leases(replica, now).values()
        return "in_use" if any(name == adapter for _, name in leases) else "idle"

    def clear(self, replica: str) -> None:
        self._resident.pop(replica, None)
        self._loading.pop(replica, None)

    def forget(self, adapter: str) -> None:
        self._popularity.pop(adapter, None)
        for resident in self._resident.values():
            resident.pop(adapter, None)
        for markers in self._loading.values():
            markers.pop(adapter, None)

    def state(self, replica: str, now: float) -> ReplicaState:
        resident = self._resident.get(replica, {})
        mru_first = sorted(resident, key=lambda name: resident[name], reverse=True)
        return ReplicaState(mru_first, len(self._live_leases(replica, now)))


class PlacementState:
    """The placement the router uses: in Redis when configured (shared by every router
    process), else, or while Redis fails, in this process."""

    def __init__(
        self,
        redis: RedisState | None,
        policy: Policy,
        *,
        key_prefix: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self.policy = policy
        # One hash tag for every key, so the script's keys share a Redis Cluster slot.
        self._prefix = "{" + key_prefix + "}"
        self._clock = clock
        self._local = LocalPlacement(policy)
        self._script = redis.client.register_script(_PLACE_LUA) if redis else None
        self._finish = redis.client.register_script(_FINISH_LOAD_LUA) if redis else None
        self._evicted = redis.client.register_script(_EVICTED_STATE_LUA) if redis else None

    def _resident_key(self, replica: str) -> str:
        return f"{self._prefix}resident:{replica}"

    def _leases_key(self, replica: str) -> str:
        return f"{self._prefix}leases:{replica}"

    def _owners_key(self, replica: str) -> str:
        return f"{self._prefix}lease-adapters:{replica}"

    def _loading_key(self, replica: str) -> str:
        return f"{self._prefix}loading:{replica}"

    @property
    def _popularity_key(self) -> str:
        return f"{self._prefix}popularity"

    async def _attempt(self, operation: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """`call()` against Redis; None when there is no Redis or it failed."""
        if self._redis is None:
            return None
        return await self._redis.attempt(operation, call, None)

    async def place(self, candidates: Sequence[Slot], adapter: str) -> Placement:
        """Choose a replica among `candidates` (non-empty) for `adapter` ("" = base model)
        and record the route as in flight there."""
        token = uuid.uuid4().hex
        now = self._clock()
        policy = self.policy
        args: list[Any] = [
            adapter,
            int(now * 1000),
            int(policy.lease_s * 1000),
            token,
            repr(policy.spill_factor),
            repr(policy.spill_margin),
            repr(policy.decay),
        ]
        for slot in candidates:
            args += [slot.capacity, 1 if adapter in slot.pinned else 0, int(slot.load_s * 1000)]
        keys = [self._resident_key(s.name) for s in candidates]
        keys += [self._leases_key(s.name) for s in candidates]
        keys += [self._owners_key(s.name) for s in candidates]
        keys += [self._loading_key(s.name) for s in candidates]
        keys += [f"{self._prefix}uses", self._popularity_key]
        script = self._script

        async def run() -> Any:
            assert script is not None
            return await script(keys=keys, args=args)

        reply = await self._attempt("route", run)
        if reply is None:
            return self._local.place(candidates, adapter, token, now)
        index, loaded, spilled, in_flight, evicted, resident, loading = reply
        slot = candidates[int(index) - 1]
        marked = bool(loaded) and slot.load_s > 0
        self._local.mirror(
            slot.name,
            adapter,
            [_text(a) for a in resident],
            token,
            now + policy.lease_s,
            int(now * 1000) + int(slot.load_s * 1000) if marked else None,
        )
        return Placement(
            replica=slot.name,
            route_id=slot.name + ROUTE_ID_SEPARATOR + token,
            loaded=bool(loaded),
            spilled=bool(spilled),
            in_flight=int(in_flight),
            evicted=tuple(_text(a) for a in evicted),
            loading=bool(loading),
        )

    async def release(self, route_id: str) -> bool:
        """End a route's lease; False when it was unknown, expired or already released."""
        parts = split_route_id(route_id)
        if parts is None:
            return False
        replica, token = parts
        now = self._clock()
        local = self._local.release(replica, token, now)
        key = self._leases_key(replica)

        async def run() -> bool:
            assert self._redis is not None
            async with self._redis.client.pipeline(transaction=True) as pipe:
                pipe.zscore(key, token)
                pipe.zrem(key, token)
                pipe.hdel(self._owners_key(replica), token)
                expiry, removed, _ = await pipe.execute()
            # An expired lease that no route has purged yet is not in flight any more.
            return bool(removed) and expiry is not None and expiry > now * 1000

        # A route placed while Redis was down is known only here.
        return bool(await self._attempt("release", run)) or local

    async def finish_load(self, route_id: str, adapter: str, ok: bool) -> None:
        """The load the route `route_id` made of `adapter` ended: routes waiting for it go
        on; when it failed, the residency its cold start recorded is taken back."""
        parts = split_route_id(route_id)
        assert parts is not None, route_id
        replica, token = parts
        self._local.finish_load(replica, adapter, token, ok)
        keys = [self._loading_key(replica), self._resident_key(replica)]
        script = self._finish

        async def run() -> None:
            assert script is not None
            await script(keys=keys, args=[adapter, token, 1 if ok else 0])

        await self._attempt("finish_load", run)

    async def load_state(self, replica: str, adapter: str) -> LoadState:
        """Whether `adapter` is still loading on `replica`, is there, or is not (its load
        failed, or it was evicted or forgotten)."""

        async def run() -> LoadState:
            assert self._redis is not None
            async with self._redis.client.pipeline(transaction=False) as pipe:
                pipe.hexists(self._loading_key(replica), adapter)
                pipe.zscore(self._resident_key(replica), adapter)
                loading, score = await pipe.execute()
            if loading:
                return "loading"
            return "resident" if score is not None else "gone"

        shared = await self._attempt("load_state", run)
        return self._local.load_state(replica, adapter) if shared is None else shared

    async def evicted_state(self, replica: str, adapter: str) -> EvictedState:
        """Whether `adapter`, evicted from `replica`, may be unloaded there now ("idle": no
        unexpired lease there names it), not yet ("in_use"), or not at all ("resident": a
        cold start brought it back)."""
        now = self._clock()
        keys = [self._resident_key(replica), self._leases_key(replica), self._owners_key(replica)]
        script = self._evicted

        async def run() -> EvictedState:
            assert script is not None
            state = _text(await script(keys=keys, args=[adapter, int(now * 1000)]))
            assert state in ("idle", "in_use", "resident"), state
            return cast(EvictedState, state)

        shared = await self._attempt("evicted_state", run)
        return self._local.evicted_state(replica, adapter, now) if shared is None else shared

    async def forget(self, adapter: str, replicas: Sequence[str]) -> None:
        """Drop `adapter` from every replica and from the popularity counts (its weights
        changed, or it was deleted)."""
        self._local.forget(adapter)

        async def run() -> None:
            assert self._redis is not None
            async with self._redis.client.pipeline(transaction=True) as pipe:
                for replica in replicas:
                    pipe.zrem(self._resident_key(replica), adapter)
                    pipe.hdel(self._loading_key(replica), adapter)
                pipe.zrem(self._popularity_key, adapter)
                await pipe.execute()

        await self._attempt("forget", run)

    async def clear(self, replica: str) -> None:
        """Forget everything resident on `replica` (it restarted and lost its adapters)."""
        self._local.clear(replica)
        keys = [self._resident_key(replica), self._loading_key(replica)]

        async def run() -> None:
            assert self._redis is not None
            await self._redis.client.delete(*keys)

        await self._attempt("clear", run)

    async def states(self, replicas: Sequence[str]) -> dict[str, ReplicaState]:
        """Resident adapters and in-flight count of each replica."""
        now = self._clock()

        async def run() -> dict[str, ReplicaState]:
            assert self._redis is not None
            async with self._redis.client.pipeline(transaction=False) as pipe:
                for replica in replicas:
                    pipe.zrevrange(self._resident_key(replica), 0, -1)
                    pipe.zcount(self._leases_key(replica), f"({int(now * 1000)}", "+inf")
                replies = await pipe.execute()
            return {
                replica: ReplicaState([_text(a) for a in replies[2 * i]], int(replies[2 * i + 1]))
                for i, replica in enumerate(replicas)
            }

        shared = await self._attempt("list_replicas", run)
        if shared is not None:
            return dict(shared)
        return {replica: self._local.state(replica, now) for replica in replicas}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
