"""AdaptiveScaling's grow path without a cloud: the quota caps a grow instead of failing it,
other refusals count toward the runaway failsafe, and the failsafe says once why it stopped."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from prefect_azmanagers.cluster.adapt import Adapt, AdaptivePolicy
from prefect_azmanagers.cluster.membership import MAX_FAILURES_IN_A_ROW
from prefect_azmanagers.cluster.scaling import AdaptiveScaling
from prefect_azmanagers.exceptions import AllocationFailed, QuotaExceeded


class FakeMembership:
    """Grows succeed up to `room` instances; past it, QuotaExceeded says how many fit."""

    def __init__(self, room: int | None = None, refuse: Exception | None = None, live: int = 0):
        self.room, self.refuse = room, refuse
        self.grown: list[int] = []
        self.asked: list[int] = []
        self.members: dict = {}
        self.claims: list = []
        self.failures_in_a_row = 0
        self.last_failure = "instance x: boot script failed"
        self.failed_with: list[Exception] = []
        self._live = [SimpleNamespace()] * live

    def live(self) -> list:
        return self._live

    async def grow(self, count: int) -> None:
        self.asked.append(count)
        if self.refuse is not None:
            raise self.refuse
        if self.room is not None and count > self.room:
            raise QuotaExceeded(f"cores: limit 8, short for {count}", fits=self.room)
        self.grown.append(count)
        if self.room is not None:
            self.room -= count

    def provisioning_failed(self, exc: Exception) -> None:
        self.failed_with.append(exc)


def scaling(membership: FakeMembership, queued: int) -> tuple[AdaptiveScaling, SimpleNamespace]:
    """AdaptiveScaling over fakes, seeing `queued` tasks and the fake's live instances."""
    dispatcher = SimpleNamespace(checks=0)
    dispatcher.fail_if_hopeless = lambda: setattr(dispatcher, "checks", dispatcher.checks + 1)
    lifecycle = SimpleNamespace(
        membership=membership, dispatcher=dispatcher, closing=False,
        options=SimpleNamespace(ppi=1, concurrency=1),
        progress=SimpleNamespace(set_total=lambda total: None))
    adaptive = AdaptiveScaling(lifecycle, AdaptivePolicy(Adapt(maximum=10)))
    adaptive.snapshot = lambda now: _snapshot(queued, live=len(membership.live()))
    return adaptive, dispatcher


def test_a_grow_past_the_quota_asks_for_what_fits_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger="prefect_azmanagers.cluster")
    membership = FakeMembership(room=2)
    adaptive, _ = scaling(membership, queued=5)
    asyncio.run(adaptive.step())
    assert membership.asked == [5, 2] and membership.grown == [2]
    assert membership.failures_in_a_row == 0
    assert any("the quota caps this cluster at 2 instances" in r.getMessage() for r in caplog.records)


def test_a_full_quota_with_instances_live_waits_and_is_no_failure():
    membership = FakeMembership(room=0, live=2)
    adaptive, _ = scaling(membership, queued=5)
    asyncio.run(adaptive.step())
    asyncio.run(adaptive.step())  # right after: the quota is not asked again yet
    assert membership.asked == [5] and membership.grown == []  # 5 queued + 2 running on 2
    assert membership.failures_in_a_row == 0


def test_a_full_quota_with_nothing_live_is_a_failure_the_flow_hears():
    membership = FakeMembership(room=0, live=0)
    adaptive, dispatcher = scaling(membership, queued=3)
    asyncio.run(adaptive.step())
    assert membership.failures_in_a_row == 1 and isinstance(membership.failed_with[0], QuotaExceeded)
    assert dispatcher.checks == 1


def test_refused_grows_count_toward_the_failsafe_which_then_says_why_once(caplog):
    caplog.set_level(logging.INFO, logger="prefect_azmanagers.cluster")
    membership = FakeMembership(refuse=AllocationFailed("no capacity"))
    adaptive, _ = scaling(membership, queued=4)
    for _ in range(MAX_FAILURES_IN_A_ROW + 3):
        asyncio.run(adaptive.step())
    assert len(membership.asked) == MAX_FAILURES_IN_A_ROW  # no grow once tripped
    assert membership.failures_in_a_row == MAX_FAILURES_IN_A_ROW
    told = [r.getMessage() for r in caplog.records if "not scaling up any more" in r.getMessage()]
    assert len(told) == 1 and "boot script failed" in told[0]


def _snapshot(queued: int, live: int):
    from prefect_azmanagers.cluster.adapt import InstanceView, Snapshot

    busy = [InstanceView(key=str(i), joined=True, inflight=1, idle_for=0.0, spot=False)
            for i in range(live)]
    return Snapshot(queued=queued, running=live, instances=busy, requested=0, removing=0,
                    requested_last_minute=0, instance_hours=0.0, per_instance=1)


@pytest.mark.parametrize(("regular", "spot", "fits"), [(4, 0, 2), (0, 4, 4), (2, 2, 4)])
def test_instances_that_fit_keeps_the_priority_mix(regular, spot, fits):
    from prefect_azmanagers.azure.quota import Sku, Usage, instances_that_fit

    sku = Sku("Standard_D2s_v3", "standardDSv3Family", 2)
    usages = {"cores": Usage("cores", 4, 8), "standarddsv3family": Usage("standardDSv3Family", 4, 100),
              "lowprioritycores": Usage("lowPriorityCores", 0, 100)}
    assert instances_that_fit(sku, usages, regular=regular, spot=spot) == fits
