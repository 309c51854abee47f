"""Eviction policies: they only order candidates, so they are tested as pure functions."""

from __future__ import annotations

import pytest

from clearml_umem.policy import POLICIES, Candidate, CostAwarePolicy, LRUPolicy, make_policy
from clearml_umem.tiers import Tier

GB = 1_000_000_000


def cand(name: str, *, last_used: float = 0.0, uses: int = 0, device: int = GB, host: int = 0,
         tier: Tier = Tier.GPU, swap_in: float | None = None) -> Candidate:
    return Candidate(name, tier, device, host, last_used, uses, swap_in)


def names(ranked: list[Candidate]) -> list[str]:
    return [c.name for c in ranked]


def test_lru_orders_by_last_use_then_name() -> None:
    cands = [cand("c", last_used=5), cand("b", last_used=1), cand("a", last_used=9), cand("d", last_used=1)]
    assert names(LRUPolicy().rank(cands, now=10)) == ["b", "d", "c", "a"]


def test_lru_ignores_size_and_frequency() -> None:
    cands = [cand("busy", last_used=1, uses=1000, device=100 * GB), cand("fresh", last_used=2, uses=0, device=1)]
    assert names(LRUPolicy().rank(cands, now=3)) == ["busy", "fresh"]


def test_lru_does_not_mutate_its_input() -> None:
    cands = [cand("b", last_used=2), cand("a", last_used=1)]
    LRUPolicy().rank(cands, now=3)
    assert names(cands) == ["b", "a"]


def test_cost_rarely_used_goes_before_frequently_used() -> None:
    policy = CostAwarePolicy()
    # "often" was used less recently, so LRU would evict it; its frequency keeps it.
    cands = [cand("often", last_used=90, uses=50), cand("once", last_used=99, uses=1)]
    assert names(LRUPolicy().rank(cands, now=100)) == ["often", "once"]
    assert names(policy.rank(cands, now=100)) == ["once", "often"]


def test_cost_frequency_decays_with_idle_time() -> None:
    policy = CostAwarePolicy(half_life_s=10)
    # 20 uses idle for 100 s (10 half-lives) is worth less than 2 recent uses.
    cands = [cand("stale", last_used=0, uses=20), cand("recent", last_used=100, uses=2)]
    assert names(policy.rank(cands, now=100)) == ["stale", "recent"]
    # Seen right after its last use, the frequent one stays.
    assert names(policy.rank(cands, now=0)) == ["recent", "stale"]


def test_cost_cheap_to_bring_back_goes_first() -> None:
    policy = CostAwarePolicy()
    cands = [cand("slow", swap_in=30.0), cand("fast", swap_in=0.2)]
    assert names(policy.rank(cands, now=0)) == ["fast", "slow"]


def test_cost_larger_goes_first_when_miss_cost_is_equal() -> None:
    policy = CostAwarePolicy()
    cands = [cand("small", device=GB, swap_in=1.0), cand("large", device=8 * GB, swap_in=1.0)]
    assert names(policy.rank(cands, now=0)) == ["large", "small"]


def test_cost_without_observations_size_cancels_and_frequency_decides() -> None:
    policy = CostAwarePolicy()
    same_use = [cand("big", device=40 * GB, uses=3), cand("tiny", device=GB // 10, uses=3)]
    # equal value: the LRU tie-break (then the name) decides
    assert names(policy.rank(same_use, now=0)) == ["big", "tiny"]
    used_more = [cand("big", device=40 * GB, uses=9), cand("tiny", device=GB // 10, uses=3)]
    assert names(policy.rank(used_more, now=0)) == ["tiny", "big"]


def test_cost_ties_fall_back_to_lru_order() -> None:
    cands = [cand("b", last_used=5, uses=2), cand("a", last_used=7, uses=2), cand("c", last_used=3, uses=2)]
    # with no decay to speak of, equal uses and sizes give equal values
    flat = CostAwarePolicy(half_life_s=1e12)
    assert names(flat.rank(cands, now=10)) == ["c", "b", "a"]
    same_time = [cand("b", last_used=5, uses=2), cand("a", last_used=5, uses=2)]
    assert names(flat.rank(same_time, now=10)) == ["a", "b"]


def test_cost_compares_ram_and_gpu_models_in_the_same_units() -> None:
    # A host-memory victim pool mixes RAM models (no device bytes) with hot ones: a model
    # must be valued per byte it occupies wherever it is, not per device byte.
    policy = CostAwarePolicy()
    warm = cand("a-warm", tier=Tier.RAM, device=0, host=4 * GB, uses=3)
    hot = cand("b-hot", tier=Tier.GPU, device=4 * GB, host=0, uses=3)
    assert names(policy.rank([hot, warm], now=0)) == ["a-warm", "b-hot"]
    warm_busier = cand("a-warm", tier=Tier.RAM, device=0, host=4 * GB, uses=30)
    assert names(policy.rank([warm_busier, hot], now=0)) == ["b-hot", "a-warm"]


def test_cost_zero_observed_swap_time_is_cheapest() -> None:
    policy = CostAwarePolicy()
    cands = [cand("x", swap_in=0.0, uses=100), cand("y", swap_in=0.5, uses=0)]
    assert names(policy.rank(cands, now=0)) == ["x", "y"]


def test_cost_rejects_bad_half_life() -> None:
    with pytest.raises(ValueError, match="half_life_s"):
        CostAwarePolicy(half_life_s=0)


def test_make_policy_by_name() -> None:
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert isinstance(make_policy("cost"), CostAwarePolicy)
    assert make_policy("lru").name == "lru" and make_policy("cost").name == "cost"
    assert set(POLICIES) == {"lru", "cost"}


def test_make_policy_unknown_lists_known() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'mru'; known: lru, cost"):
        make_policy("mru")


def test_empty_candidates() -> None:
    assert LRUPolicy().rank([], now=0) == []
    assert CostAwarePolicy().rank([], now=0) == []
