"""Which replica runs a request: adapter affinity over residency, popularity and in-flight
leases.

State: per replica, the adapters resident there (scored by their last use, so they list most
recently used first) and the routes in flight there, each a lease that ends at ReleaseRoute
or at its expiry; across replicas, each adapter's popularity, a count of its routes decayed
with a half-life counted in routes (LRFU: half-life 0 makes it its last use, i.e. plain
LRU). "Load" is a replica's count of unexpired leases.

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
from typing import Any

from daert.runtime.redis_state import RedisState

# The route id carries its replica, so ReleaseRoute needs no lookup: "<replica>/<token>".
ROUTE_ID_SEPARATOR = "/"


@dataclass(frozen=True)
class Slot:
    """The placement's view of one replica."""

    name: str
    capacity: int  # most adapters resident at once
    # Adapters always resident and never loaded or evicted here (TGI's LORA_ADAPTERS).
    pinned: tuple[str, ...] = ()


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


# KEYS: resident zset of each candidate (n), lease zset of each candidate (n), use counter,
#       popularity zset.
# ARGV: adapter ("" = base model), now_ms, lease_ms, token, spill_factor, spill_margin,
#       decay, then per candidate its capacity and 1 if the adapter is pinned there else 0.
# Mirrors LocalPlacement.place step for step; tests check that the two agree.
_PLACE_LUA = """
local n = (#KEYS - 2) / 2
local uses_key, popularity_key = KEYS[2 * n + 1], KEYS[2 * n + 2]
local adapter, now, lease, token = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local factor, margin, decay = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local function capacity(i) return tonumber(ARGV[6 + 2 * i]) end
local function pinned(i) return ARGV[7 + 2 * i] == '1' end

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
  for _, member in ipairs(redis.call('ZRANGE', KEYS[i], 0, -1)) do
    if member ~= adapter then
      local s = tonumber(redis.call('ZSCORE', popularity_key, member)) or -math.huge
      if best_score == nil or s < best_score then best, best_score = member, s end
    end
  end
  return best, best_score
end

local loads, holds, total, min_load = {}, {}, 0, nil
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[n + i], '-inf', now)
  loads[i] = redis.call('ZCARD', KEYS[n + i])
  total = total + loads[i]
  if min_load == nil or loads[i] < min_load then min_load = loads[i] end
  holds[i] = adapter ~= '' and (pinned(i) or redis.call('ZSCORE', KEYS[i], adapter) ~= false)
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
      if redis.call('ZCARD', KEYS[i]) >= capacity(i) then
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

redis.call('ZADD', KEYS[n + choice], now + lease, token)
local evicted = {}
if adapter ~= '' and not pinned(choice) then
  redis.call('ZADD', KEYS[choice], use, adapter)
  while redis.call('ZCARD', KEYS[choice]) > capacity(choice) do
    local member = victim(choice)
    redis.call('ZREM', KEYS[choice], member)
    table.insert(evicted, member)
  end
end
return {choice, (adapter ~= '' and not holds[choice]) and 1 or 0,
        (holder ~= nil and choice ~= holder) and 1 or 0, loads[choice] + 1, evicted,
        redis.call('ZREVRANGE', KEYS[choice], 0, -1)}
"""


class LocalPlacement:
    """The placement rule on this process's own state: used without Redis and while Redis
    fails."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._resident: dict[str, dict[str, int]] = {}  # replica -> adapter -> last use
        self._leases: dict[str, dict[str, float]] = {}  # replica -> token -> expiry (s)
        self._popularity: dict[str, float] = {}
        self._uses = 0

    def _live_leases(self, replica: str, now: float) -> dict[str, float]:
        leases = self._leases.setdefault(replica, {})
        for token in [t for t, expiry in leases.items() if expiry <= now]:
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
        self._leases.setdefault(slot.name, {})[token] = now + policy.lease_s
        evicted: list[str] = []
        if adapter and adapter not in slot.pinned:
            resident = self._resident.setdefault(slot.name, {})
            resident[adapter] = use
            while len(resident) > slot.capacity:
                name, _ = self._victim(slot.name, adapter)
                del resident[name]
                evicted.append(name)
        return Placement(
            replica=slot.name,
            route_id=slot.name + ROUTE_ID_SEPARATOR + token,
            loaded=bool(adapter) and not holds[choice],
            spilled=holder is not None and choice != holder,
            in_flight=loads[choice] + 1,
            evicted=tuple(evicted),
        )

    def mirror(
        self,
        replica: str,
        adapter: str,
        resident_mru_first: Sequence[str],
        token: str,
        expiry: float,
    ) -> None:
        """Take over a decision made in Redis: the use, the replica's resident set, the
        lease."""
        if adapter:
            self._use(adapter)
        # Last uses that keep Redis's order, the adapter just used being the latest.
        self._resident[replica] = {
            name: self._uses - rank for rank, name in enumerate(resident_mru_first)
        }
        self._leases.setdefault(replica, {})[token] = expiry

    def release(self, replica: str, token: str, now: float) -> bool:
        expiry = self._leases.get(replica, {}).pop(token, None)
        return expiry is not None and expiry > now

    def drop(self, replica: str, adapter: str | None) -> None:
        """Forget one adapter on `replica`, or (None) all of them."""
        if adapter is None:
            self._resident.pop(replica, None)
        else:
            self._resident.get(replica, {}).pop(adapter, None)

    def forget(self, adapter: str) -> None:
        self._popularity.pop(adapter, None)
        for resident in self._resident.values():
            resident.pop(adapter, None)

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

    def _resident_key(self, replica: str) -> str:
        return f"{self._prefix}resident:{replica}"

    def _leases_key(self, replica: str) -> str:
        return f"{self._prefix}leases:{replica}"

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
            args += [slot.capacity, 1 if adapter in slot.pinned else 0]
        keys = [self._resident_key(s.name) for s in candidates]
        keys += [self._leases_key(s.name) for s in candidates]
        keys += [f"{self._prefix}uses", self._popularity_key]
        script = self._script

        async def run() -> Any:
            assert script is not None
            return await script(keys=keys, args=args)

        reply = await self._attempt("route", run)
        if reply is None:
            return self._local.place(candidates, adapter, token, now)
        index, loaded, spilled, in_flight, evicted, resident = reply
        slot = candidates[int(index) - 1]
        self._local.mirror(
            slot.name, adapter, [_text(a) for a in resident], token, now + policy.lease_s
        )
        return Placement(
            replica=slot.name,
            route_id=slot.name + ROUTE_ID_SEPARATOR + token,
            loaded=bool(loaded),
            spilled=bool(spilled),
            in_flight=int(in_flight),
            evicted=tuple(_text(a) for a in evicted),
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
                expiry, removed = await pipe.execute()
            # An expired lease that no route has purged yet is not in flight any more.
            return bool(removed) and expiry is not None and expiry > now * 1000

        # A route placed while Redis was down is known only here.
        return bool(await self._attempt("release", run)) or local

    async def drop(self, replica: str, adapter: str) -> None:
        """Take back the residency a cold start recorded when the load failed."""
        self._local.drop(replica, adapter)
        key = self._resident_key(replica)

        async def run() -> None:
            assert self._redis is not None
            await self._redis.client.zrem(key, adapter)

        await self._attempt("drop", run)

    async def forget(self, adapter: str, replicas: Sequence[str]) -> list[str]:
        """Drop `adapter` from every replica and from the popularity counts (its weights
        changed, or it was deleted); returns the replicas that held it."""
        now = self._clock()
        held = [r for r in replicas if adapter in self._local.state(r, now).resident]
        self._local.forget(adapter)

        async def run() -> list[str]:
            assert self._redis is not None
            async with self._redis.client.pipeline(transaction=True) as pipe:
                for replica in replicas:
                    pipe.zrem(self._resident_key(replica), adapter)
                pipe.zrem(self._popularity_key, adapter)
                removed = await pipe.execute()
            held = removed[: len(replicas)]  # the last reply is the popularity's
            return [r for r, n in zip(replicas, held, strict=True) if n]

        shared = await self._attempt("forget", run)
        return held if shared is None else list(shared)

    async def clear(self, replica: str) -> None:
        """Forget everything resident on `replica` (it restarted and lost its adapters)."""
        self._local.drop(replica, None)
        key = self._resident_key(replica)

        async def run() -> None:
            assert self._redis is not None
            await self._redis.client.delete(key)

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
