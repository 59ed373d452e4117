"""The traffic split's choice of version: proportions, stickiness, weights of 0."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from deployments.ingress.rollout.split import choose_version, entity_key, key_point


def test_keys_spread_over_the_versions_by_weight() -> None:
    counts = Counter(choose_version("risk", {"1": 95, "2": 5}, f"account-{i}")
                     for i in range(20_000))
    assert set(counts) == {"1", "2"}
    assert 0.045 < counts["2"] / 20_000 < 0.055, counts


def test_a_key_keeps_its_version_and_the_choice_is_per_model() -> None:
    traffic = {"1": 50, "2": 50}
    for i in range(200):
        first = choose_version("risk", traffic, f"k{i}")
        assert all(choose_version("risk", traffic, f"k{i}") == first for _ in range(5))
    # Another model hashes the same keys elsewhere: not every key lands the same way.
    same = sum(choose_version("risk", traffic, f"k{i}") == choose_version("fraud", traffic,
                                                                          f"k{i}")
               for i in range(1000))
    assert 350 < same < 650


def test_growing_the_new_version_moves_keys_one_way_only() -> None:
    """The shares are contiguous ranges in version order: 5 % -> 10 % for version 2 moves
    keys from 1 to 2 and never one from 2 back to 1 (an account never flips back)."""
    keys = [f"acct-{i}" for i in range(5000)]
    before = {k: choose_version("risk", {"1": 95, "2": 5}, k) for k in keys}
    after = {k: choose_version("risk", {"1": 90, "2": 10}, k) for k in keys}
    assert all(after[k] == "2" for k in keys if before[k] == "2")
    moved = sum(before[k] == "1" and after[k] == "2" for k in keys)
    assert 150 < moved < 350  # about 5 % of 5000


def test_without_a_key_the_draw_decides_and_zero_weights_are_never_chosen() -> None:
    rng = random.Random(7)
    counts = Counter(choose_version("m", {"1": 1, "2": 3, "3": 0}, None, draw=rng.random)
                     for _ in range(8000))
    assert "3" not in counts
    assert 0.72 < counts["2"] / 8000 < 0.78
    assert choose_version("m", {"1": 0, "2": 1}, None, draw=lambda: 0.0) == "2"
    assert choose_version("m", {"1": 1, "2": 1}, None, draw=lambda: 0.999999) == "2"
    with pytest.raises(ValueError, match="every weight is 0"):
        choose_version("m", {"1": 0}, "k")


def test_versions_are_ordered_numerically() -> None:
    # "10" after "9": draws below 1/2 go to the first version in version order.
    assert choose_version("m", {"10": 1, "9": 1}, None, draw=lambda: 0.1) == "9"


def test_entity_keys_do_not_depend_on_field_order_and_points_are_stable() -> None:
    assert entity_key({"b": 2, "a": "x"}) == entity_key({"a": "x", "b": 2}) == "a=x&b=2"
    assert key_point("m", "k") == key_point("m", "k")
    assert 0 <= key_point("m", "k") < 1
    assert key_point("m", "k" * 600) == key_point("m", "k" * 512)  # long keys are cut

