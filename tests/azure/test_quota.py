"""Quota arithmetic: which limits a request exceeds, and the priority-mix split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from prefect_azmanagers.azure.quota import Sku, Usage, priority_split, shortfalls

SKU = Sku("Standard_D8s_v3", "standardDSv3Family", 8)


def usages(family=(0, 100), cores=(0, 100), low=(0, 100)):
    return {u.name.lower(): u for u in (Usage("standardDSv3Family", *family), Usage("cores", *cores),
                                        Usage("lowPriorityCores", *low))}


def test_enough_quota():
    assert shortfalls(SKU, usages(), regular=12, spot=0) == []


def test_family_short_gives_numbers():
    [short] = shortfalls(SKU, usages(family=(80, 100)), regular=3, spot=0)
    assert (short.quota, short.limit, short.current, short.required) == ("standardDSv3Family", 100, 80, 24)
    assert "short by 4" in str(short)


def test_regional_total_is_checked_too():
    # The original only checked the family quota.
    [short] = shortfalls(SKU, usages(cores=(90, 100)), regular=2, spot=0)
    assert short.quota == "cores"


def test_spot_counts_only_against_low_priority():
    assert shortfalls(SKU, usages(family=(100, 100), cores=(100, 100)), regular=0, spot=5) == []
    [short] = shortfalls(SKU, usages(low=(0, 32)), regular=0, spot=5)
    assert (short.quota, short.required) == ("lowPriorityCores", 40)


def test_exact_fit_passes():
    assert shortfalls(SKU, usages(family=(84, 100), cores=(84, 100)), regular=2, spot=0) == []


def test_unknown_usage_is_not_a_limit():
    assert shortfalls(SKU, {}, regular=1000, spot=1000) == []


def test_priority_split_examples():
    # Azure's documented example: base 10, 50% above -> at 30 VMs: 20 regular, 10 spot.
    assert priority_split(30, 10, 50) == (20, 10)
    assert priority_split(5, 10, 50) == (5, 0)
    assert priority_split(4, 0, 0) == (0, 4)
    assert priority_split(3, 1, 50) == (2, 1)


@given(st.integers(0, 1000), st.integers(0, 100), st.integers(0, 100))
def test_priority_split_is_a_partition_and_monotone(capacity, base, pct):
    regular, spot = priority_split(capacity, base, pct)
    assert regular + spot == capacity and regular >= min(capacity, base) and spot >= 0
    r2, s2 = priority_split(capacity + 1, base, pct)
    assert r2 >= regular and s2 >= spot
