"""The backpressure policy (cluster/backpressure.py), driven by a fake clock: no I/O."""

from __future__ import annotations

import pytest

from prefect_azmanagers.cluster.backpressure import Backpressure
from prefect_azmanagers.exceptions import PrefectAPIUnreachable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(**options) -> tuple[Backpressure, Clock]:
    clock = Clock()
    return Backpressure("http://127.0.0.1:4200/api", clock=clock, **options), clock


def test_the_cap_bounds_task_runs_in_flight():
    bp, _ = policy(max_in_flight=4)
    assert [bp.may_dispatch(n) for n in range(6)] == [True] * 4 + [False] * 2


@pytest.mark.parametrize("status", [429, 503, 500, None])
def test_an_overloaded_or_failing_api_halves_the_cap_and_holds_dispatch(status):
    bp, clock = policy(max_in_flight=64, pause=1.0)
    bp.observe(status, 0.05, retry_after=3.0)
    assert bp.limit == 32
    assert not bp.may_dispatch(0) and bp.wait_time() == 3.0
    clock.now += 3.0
    assert bp.may_dispatch(31) and not bp.may_dispatch(32)


def test_a_slow_answer_slows_dispatch_too():
    bp, _ = policy(max_in_flight=64, slow_after=2.0)
    bp.observe(200, 0.5)
    assert bp.limit == 64
    bp.observe(200, 2.5)
    assert bp.limit == 32


def test_the_cap_never_drops_below_its_floor_and_recovers_one_step_per_streak():
    bp, clock = policy(max_in_flight=8, min_in_flight=2, recover_after=3)
    for _ in range(10):
        bp.observe(503, 0.01)
    assert bp.limit == 2
    clock.now += 10
    for _ in range(3 * 4):
        bp.observe(200, 0.01)
    assert bp.limit == 6
    for _ in range(3 * 10):
        bp.observe(200, 0.01)
    assert bp.limit == 8  # never above the configured cap


def test_an_api_gone_longer_than_the_bound_fails_with_a_clear_error():
    bp, clock = policy(give_up_after=60)
    bp.observe(None, 10.0, what="POST /api/task_runs/")
    clock.now += 59
    bp.check()  # still within the bound
    bp.observe(503, 0.1, what="GET /api/health")
    clock.now += 2
    with pytest.raises(PrefectAPIUnreachable, match=r"only failures for 61 s \(last: GET "
                                                    r"/api/health: HTTP 503\).*60 s allowed"):
        bp.check()


def test_one_good_answer_restarts_the_give_up_clock():
    bp, clock = policy(give_up_after=60)
    bp.observe(503, 0.1)
    clock.now += 50
    bp.observe(200, 0.1)
    clock.now += 50
    bp.check()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_in_flight <= max_in_flight"):
        policy(max_in_flight=2, min_in_flight=3)
    with pytest.raises(ValueError, match="positive"):
        policy(give_up_after=0)


def test_flows_sharing_a_cluster_pace_by_all_their_backlogs_and_each_removes_its_own():
    bp, _ = policy(max_unrecorded=10)
    assert bp.may_dispatch(50)  # no backlog to read: only the cap
    first = bp.pace_by_unrecorded(lambda: 4)
    second = bp.pace_by_unrecorded(lambda: 3)
    assert bp.may_dispatch(2) and not bp.may_dispatch(3)  # 3 in flight + 4 + 3 back = 10
    first()  # the first flow ended
    assert bp.may_dispatch(6) and not bp.may_dispatch(7)  # the second one still paces
    second()
    assert bp.may_dispatch(50)
