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
    # r0 is busier (1 vs 0) but within the margin, and its "a" is older than r1's "b".
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
    assert await state.forget("a", ["r0", "r1"]) == ["r0"]
    await state.clear("r1")
    states = await state.states(["r0", "r1"])
    assert states["r0"].resident == [] and states["r1"].resident == []


@pytest.mark.parametrize("policy", [LRU, LRFU], ids=["lru", "lrfu"])
async def test_redis_script_decides_exactly_as_the_local_rule(
    redis_state: RedisState, policy: Policy
) -> None:
    """Random routes, releases and expiries on both; every decision and state must match."""
    clock = Clock()
    prefix = f"parity-{uuid.uuid4().hex}:"
    shared = PlacementState(redis_state, policy, key_prefix=prefix, clock=clock)
    alone = local(policy, clock)
    slots = [Slot("r0", 2), Slot("r1", 3), Slot("r2", 2)]
    tgi = Slot("tgi", 2, pinned=("a1", "a2"))
    names = [s.name for s in [*slots, tgi]]
    rng = random.Random(5)
    in_flight: list[tuple[str, str]] = []
    for step in range(400):
        clock.now += rng.choice([0.0, 0.001, 0.5, 5.0])
        if in_flight and rng.random() < 0.35:
            one, other = in_flight.pop(rng.randrange(len(in_flight)))
            assert await shared.release(one) == await alone.release(other), step
            continue
        adapter = rng.choice(["", *(f"a{i}" for i in range(9)), "a0", "a0", "a1"])
        candidates = [*slots, tgi] if adapter in ("", "a1", "a2") else slots
        got = await shared.place(candidates, adapter)
        expected = await alone.place(candidates, adapter)
        assert (got.replica, got.loaded, got.spilled, got.in_flight, got.evicted) == (
            expected.replica,
            expected.loaded,
            expected.spilled,
            expected.in_flight,
            expected.evicted,
        ), step
        in_flight.append((got.route_id, expected.route_id))
        assert await shared.states(names) == await alone.states(names), step


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
