"""The adaptive policy, pure: growth with the work within maximum, rate and budget; removal of
idle instances only, regular before spot, never below minimum or what is wanted."""

from __future__ import annotations

import pytest

from prefect_azmanagers.cluster.adapt import Adapt, AdaptivePolicy, InstanceView, Snapshot
from prefect_azmanagers.exceptions import ConfigurationError


def view(key: str, *, inflight: int = 0, idle_for: float = 0.0, spot: bool = False) -> InstanceView:
    return InstanceView(key, True, inflight, idle_for, spot)


def snap(queued=0, running=0, instances=(), requested=0, removing=0, last_minute=0, hours=0.0,
         per_instance=2) -> Snapshot:
    return Snapshot(queued, running, list(instances), requested, removing, last_minute, hours,
                    per_instance)


def decide(adapt: Adapt, **kw):
    return AdaptivePolicy(adapt).decide(snap(**kw))


def test_grows_with_queued_and_running_work_in_one_request_up_to_maximum():
    adapt = Adapt(minimum=0, maximum=10)
    assert decide(adapt, queued=7).grow == 4            # ceil(7 / 2)
    assert decide(adapt, queued=96).grow == 10          # capped
    assert decide(adapt, queued=96, requested=6).grow == 4
    assert decide(adapt, queued=3, running=4, instances=[view("a", inflight=2)]).grow == 3


def test_the_maximum_counts_instances_still_being_deleted():
    adapt = Adapt(maximum=4)
    assert decide(adapt, queued=100, instances=[view("a")], removing=3).grow == 0
    assert decide(adapt, queued=100, instances=[view("a")], removing=1).grow == 2


def test_growth_is_rate_limited_and_stops_once_the_budget_is_spent():
    adapt = Adapt(maximum=50, max_instances_per_minute=8, max_instance_hours=2.0)
    assert decide(adapt, queued=100, last_minute=5).grow == 3
    assert decide(adapt, queued=100, last_minute=8).grow == 0
    spent = decide(adapt, queued=100, hours=2.0)
    assert spent.grow == 0 and spent.budget_spent and "max_instance_hours=2" in spent.reason


def test_removes_only_instances_idle_past_the_timeout_regular_first_then_longest_idle():
    adapt = Adapt(minimum=1, maximum=10, idle_timeout=60)
    instances = [view("busy", inflight=1), view("fresh", idle_for=10),
                 view("spot-old", idle_for=500, spot=True), view("reg", idle_for=100),
                 view("reg-old", idle_for=300)]
    assert decide(adapt, instances=instances, running=1).remove == ("reg-old", "reg", "spot-old")


def test_never_below_minimum_nor_below_what_is_wanted():
    adapt = Adapt(minimum=2, maximum=10, idle_timeout=1)
    idle = [view(k, idle_for=5) for k in "abc"]
    assert decide(adapt, instances=idle).remove == ("a",)
    assert decide(adapt, instances=idle, queued=5).remove == ()   # wanted 3: keep all


def test_bad_bounds_are_refused():
    for bad in (dict(minimum=-1), dict(maximum=0), dict(minimum=5, maximum=2),
                dict(idle_timeout=0), dict(max_instances_per_minute=0), dict(max_instance_hours=0)):
        with pytest.raises(ConfigurationError, match="Adapt"):
            Adapt(**bad)


def test_a_saved_usage_report_reads_back_and_is_private(tmp_path):
    from prefect_azmanagers.cluster.usage import UsageReport, save, saved

    report = UsageReport(3, {"Spot": 0.5, "Regular": 0.25}, 1, 2, 6, 4.5, 120.0)
    path = save("c-1", "azm-c-1", report, tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    [record] = saved(tmp_path)
    assert record["usage"] == report and record["group"] == "azm-c-1"
    assert "spot 0.500" in report.line() and "| evictions | 1 |" in report.markdown()
