"""The LoRA router's placement rule: affinity, eviction, spill, leases; and the Lua script
in a real Redis deciding exactly as the per-process fallback does."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

import pytest
from daert.local.redis import EmbeddedRedis
from daert.lora.placement import Placement, PlacementState, Policy, Slot, split_route_id
from daert.runtime.redis_state import RedisState
from prometheus_client import REGISTRY

from tests.helpers import free_port

LRU = Policy(spill_factor=2.0, spill_margin=2, popularity_half_life=0, lease_s=60.0)
LRFU = Policy(spill_factor=2.0, spill_margin=2, popularity_half_life=50, lease_s=60.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def local(policy: Policy = LRU, clock: Clock | None = None) -> PlacementState:
    return PlacementState(None, policy, key_prefix="t:", clock=clock or Clock())


@pytest.fixture
async def redis_state(redis_server: EmbeddedRedis) -> AsyncIterator[RedisState]:
    state = RedisState("lora-test", redis_server.url, None, 2.0)
    yield state
    await state.close()


async def place_all(state: PlacementState, slots: list[Slot], adapters: str) -> list[Placement]:
    return [await state.place(slots, adapter) for adapter in adapters.split()]


async def test_affinity_second_route_goes_where_the_adapter_is() -> None:
    state = local()
    slots = [Slot("r0", 4), Slot("r1", 4)]
    first, second = await place_all(state, slots, "sql sql")
    assert first.loaded and not second.loaded
    assert second.replica == first.replica
    assert (first.in_flight, second.in_flight) == (1, 2)


async def test_cold_start_prefers_a_free_slot_then_the_less_loaded() -> None:
    state = local()
    slots = [Slot("r0", 4), Slot("r1", 4)]
    placed = await place_all(state, slots, "a b c")
    assert [p.replica for p in placed] == ["r0", "r1", "r0"]
    assert all(p.loaded for p in placed)


async def test_cold_start_evicts_the_cheapest_victim_within_the_margin() -> None:
    state = local(LRU)  # spill_margin 2
    slots = [Slot("r0", 1), Slot("r1", 1)]
    await state.place(slots, "a")  # r0, stays in flight
    b = await state.place(slots, "b")  # r1, the less loaded
    assert b.replica == "r1"
    await state.release(b.route_id)
    # r0 is busier (1 vs 0) but within the margin, and its "a" is older than r1's "b": in
    # use or not, it goes.
    c = await state.place(slots, "c")
    assert (c.replica, c.evicted) == ("r0", ("a",))
    far = local(Policy(spill_factor=2.0, spill_margin=0, popularity_half_life=0, lease_s=60))
    await far.place(slots, "a")
    await far.release((await far.place(slots, "b")).route_id)
    assert (await far.place(slots, "c")).evicted == ("b",)  # margin 0: the least loaded


async def test_lru_evicts_the_least_recently_used_and_lists_mru_first() -> None:
    state = local(LRU)
    slots = [Slot("r0", 3)]
    placed = await place_all(state, slots, "a b c a d")
    assert placed[-1].evicted == ("b",)
    assert (await state.states(["r0"]))["r0"].resident == ["d", "a", "c"]


async def test_popularity_protects_an_adapter_used_often() -> None:
    state = local(LRFU)
    slots = [Slot("r0", 2)]
    placed = await place_all(state, slots, "hot hot hot rare1 rare2")
    # LRU would evict "hot" (used before rare1); by popularity the one-off goes.
    assert placed[-1].evicted == ("rare1",)
    assert (await state.states(["r0"]))["r0"].resident == ["rare2", "hot"]


async def test_overloaded_holder_spills_and_the_adapter_becomes_resident_twice() -> None:
    state = local(Policy(spill_factor=1.0, spill_margin=1, popularity_half_life=0, lease_s=60))
    slots = [Slot("r0", 4), Slot("r1", 4)]
    placed = await place_all(state, slots, "hot hot hot hot")
    # In flight before each route, and the holder's limit (mean + 1): (0, 0) cold -> r0;
    # (1, 0) 1 <= 1.5 and (2, 0) 2 <= 2 -> r0; (3, 0) 3 > 2.5 -> spills to r1.
    assert [p.replica for p in placed] == ["r0", "r0", "r0", "r1"]
    assert not any(p.spilled for p in placed[:3])
    assert placed[3].spilled and placed[3].loaded
    states = await state.states(["r0", "r1"])
    assert states["r0"].resident == states["r1"].resident == ["hot"]
    assert (states["r0"].in_flight, states["r1"].in_flight) == (3, 1)


async def test_base_model_routes_balance_and_touch_no_residency() -> None:
    state = local()
    slots = [Slot("r0", 4), Slot("r1", 4)]
    placed = await place_all(state, slots, "a")
    placed += [await state.place(slots, "") for _ in range(3)]
    assert [p.replica for p in placed] == ["r0", "r1", "r0", "r1"]
    assert not any(p.loaded for p in placed[1:])
    assert (await state.states(["r1"]))["r1"].resident == []


async def test_pinned_adapters_are_resident_and_never_evicted() -> None:
    state = local()
    tgi = Slot("tgi", 1, pinned=("a", "b"))
    placed = await place_all(state, [tgi], "a b a")
    assert not any(p.loaded or p.evicted for p in placed)


async def test_leases_end_at_release_or_expiry() -> None:
    clock = Clock()
    state = local(clock=clock)
    slots = [Slot("r0", 4)]
    first, second = await place_all(state, slots, "a a")
    assert await state.release(first.route_id)
    assert not await state.release(first.route_id)  # already released
    clock.now += LRU.lease_s + 1
    assert (await state.states(["r0"]))["r0"].in_flight == 0
    assert not await state.release(second.route_id)  # expired
    assert not await state.release("r0/not-a-token")


def test_route_ids_carry_their_replica() -> None:
    token = uuid.uuid4().hex
    assert split_route_id(f"vllm-0/{token}") == ("vllm-0", token)
    for bad in ("", token, f"/{token}", "vllm-0/short"):
        assert split_route_id(bad) is None


async def test_forget_and_clear_drop_residency() -> None:
    state = local()
    slots = [Slot("r0", 4), Slot("r1", 4)]
    await place_all(state, slots, "a b")
    await state.forget("a", ["r0", "r1"])
    await state.clear("r1")
    states = await state.states(["r0", "r1"])
    assert states["r0"].resident == [] and states["r1"].resident == []


async def test_a_cold_start_within_the_margin_evicts_an_adapter_in_use() -> None:
    state = local(LRU)  # spill_margin 2
    r0, r1 = Slot("r0", 1), Slot("r1", 1)
    await state.place([r0], "a")  # in flight on r0
    await state.release((await state.place([r1], "b")).route_id)
    for _ in range(4):
        await state.place([r1], "")  # r1: 4 in flight, beyond the margin of r0's 1
    # Leases do not protect "a": its unload waits for them instead (evicted_state).
    c = await state.place([r0, r1], "c")
    assert (c.replica, c.evicted) == ("r0", ("a",))


@pytest.fixture(params=["local", "redis"])
async def shared_or_local(
    request: pytest.FixtureRequest, redis_state: RedisState
) -> tuple[PlacementState, Clock]:
    clock = Clock()
    redis = redis_state if request.param == "redis" else None
    prefix = f"loads-{uuid.uuid4().hex}:"
    return PlacementState(redis, LRU, key_prefix=prefix, clock=clock), clock


async def test_routes_wait_for_a_load_under_way_until_it_ends_or_its_deadline(
    shared_or_local: tuple[PlacementState, Clock],
) -> None:
    state, clock = shared_or_local
    slots = [Slot("v0", 4, load_s=10.0)]
    first = await state.place(slots, "a")
    assert first.loaded and not first.loading
    second = await state.place(slots, "a")
    assert not second.loaded and second.loading
    assert await state.load_state("v0", "a") == "loading"
    await state.finish_load(first.route_id, "a", ok=True)
    assert await state.load_state("v0", "a") == "resident"
    assert not (await state.place(slots, "a")).loading

    failing = await state.place(slots, "b")
    assert (await state.place(slots, "b")).loading
    await state.finish_load(failing.route_id, "b", ok=False)
    assert await state.load_state("v0", "b") == "gone"
    assert "b" not in (await state.states(["v0"]))["v0"].resident
    assert (await state.place(slots, "b")).loaded  # cold again

    stalled = await state.place(slots, "c")
    clock.now += 10  # its deadline passes: the next route loads it
    taken_over = await state.place(slots, "c")
    assert taken_over.loaded and not taken_over.loading
    await state.finish_load(stalled.route_id, "c", ok=False)  # no longer its load
    assert await state.load_state("v0", "c") == "loading"
    await state.finish_load(taken_over.route_id, "c", ok=True)
    assert await state.load_state("v0", "c") == "resident"

    lorax = [Slot("x0", 4)]  # loads adapters itself: nothing to wait for
    await state.place(lorax, "d")
    assert not (await state.place(lorax, "d")).loading


async def test_an_evicted_adapter_is_idle_once_no_lease_names_it(
    shared_or_local: tuple[PlacementState, Clock],
) -> None:
    state, clock = shared_or_local
    slots = [Slot("r0", 1)]
    first, second = await place_all(state, slots, "a a")
    assert (await state.place(slots, "b")).evicted == ("a",)  # in use, evicted all the same
    assert (await state.states(["r0"]))["r0"].resident == ["b"]
    assert await state.evicted_state("r0", "a") == "in_use"
    await state.release(first.route_id)
    assert await state.evicted_state("r0", "a") == "in_use"
    await state.release(second.route_id)
    assert await state.evicted_state("r0", "a") == "idle"

    assert (await state.place(slots, "c")).evicted == ("b",)  # b's route never released
    assert await state.evicted_state("r0", "b") == "in_use"
    clock.now += LRU.lease_s  # its lease expires
    assert await state.evicted_state("r0", "b") == "idle"

    # A cold start brings "a" back before its unload: it is not to be unloaded at all.
    assert (await state.place(slots, "a")).evicted == ("c",)
    assert await state.evicted_state("r0", "a") == "resident"
    assert await state.evicted_state("r1", "a") == "idle"  # never there


PARITY_POLICIES = [
    Policy(spill_factor=1.0, spill_margin=1, popularity_half_life=0, lease_s=60.0),
    Policy(spill_factor=1.0, spill_margin=1, popularity_half_life=20, lease_s=60.0),
]


@pytest.mark.parametrize("policy", PARITY_POLICIES, ids=["lru", "popularity"])
async def test_redis_script_decides_exactly_as_the_local_rule(
    redis_state: RedisState, policy: Policy
) -> None:
    """Random routes, releases, load ends and expiries on both, with fewer slots than
    adapters: every decision and state must match, evictions (of adapters in use too),
    spills and what may be unloaded included."""
    clock = Clock()
    prefix = f"parity-{uuid.uuid4().hex}:"
    shared = PlacementState(redis_state, policy, key_prefix=prefix, clock=clock)
    alone = local(policy, clock)
    slots = [Slot("r0", 1), Slot("r1", 3, load_s=2.0), Slot("r2", 1)]
    tgi = Slot("tgi", 2, pinned=("a1", "a2"))
    names = [s.name for s in [*slots, tgi]]
    rng = random.Random(5)
    in_flight: list[tuple[str, str]] = []
    loads: list[tuple[str, str, str]] = []  # (adapter, route ids) of loads under way on r1
    seen = {"evictions": 0, "spills": 0, "waits": 0, "evicted in use": 0, "evicted idle": 0}
    for step in range(600):
        clock.now += rng.choice([0.0, 0.001, 0.5, 5.0])
        if in_flight and rng.random() < 0.5:
            one, other = in_flight.pop(rng.randrange(len(in_flight)))
            assert await shared.release(one) == await alone.release(other), step
            continue
        if loads and rng.random() < 0.3:
            adapter, one, other = loads.pop(rng.randrange(len(loads)))
            ok = rng.random() < 0.8
            await shared.finish_load(one, adapter, ok)
            await alone.finish_load(other, adapter, ok)
            assert await shared.states(names) == await alone.states(names), step
            continue
        adapter = rng.choice(["", *(f"a{i}" for i in range(9)), "a0", "a0", "a1"])
        candidates = [*slots, tgi] if adapter in ("", "a1", "a2") else slots
        got = await shared.place(candidates, adapter)
        expected = await alone.place(candidates, adapter)
        decision = ("replica", "loaded", "spilled", "in_flight", "evicted", "loading")
        assert [getattr(got, f) for f in decision] == [getattr(expected, f) for f in decision], step
        in_flight.append((got.route_id, expected.route_id))
        if got.loaded and got.replica == "r1":
            loads.append((adapter, got.route_id, expected.route_id))
        states = await shared.states(names)
        assert states == await alone.states(names), step
        seen["evictions"] += len(got.evicted)
        seen["spills"] += got.spilled
        seen["waits"] += got.loading
        for evicted in got.evicted:
            unload = await shared.evicted_state(got.replica, evicted)
            assert unload == await alone.evicted_state(expected.replica, evicted), step
            seen["evicted in use"] += unload == "in_use"
            seen["evicted idle"] += unload == "idle"
        for s in slots if adapter else ():
            assert await shared.evicted_state(s.name, adapter) == await alone.evicted_state(
                s.name, adapter
            ), step
            assert await shared.load_state(s.name, adapter) == await alone.load_state(
                s.name, adapter
            ), step
    assert all(seen.values()), seen


async def test_redis_down_falls_back_to_local_state_and_is_counted() -> None:
    dead = RedisState("lora-test", f"redis://127.0.0.1:{free_port()}/0", None, 0.2)
    state = PlacementState(dead, LRU, key_prefix="dead:", clock=Clock())
    labels = {"service": "lora-test", "operation": "route"}
    before = REGISTRY.get_sample_value("daert_redis_errors_total", labels) or 0.0
    slots = [Slot("r0", 4), Slot("r1", 4)]
    first, second = await place_all(state, slots, "a a")
    assert first.loaded and not second.loaded and second.replica == first.replica
    assert await state.release(first.route_id)
    assert (await state.states(["r0"]))["r0"].resident == ["a"]
    assert REGISTRY.get_sample_value("daert_redis_errors_total", labels) == before + 2
    await dead.close()
