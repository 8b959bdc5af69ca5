"""Adaptive clusters end to end on the local cloud (issue 13): a bursty workload grows to the
maximum, shrinks to the minimum in the idle gap and grows again; every result is right, no
call is re-run because of a scale-down, the maximum is never exceeded; the runner reports."""

from __future__ import annotations

import json
import threading
import time

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client

from prefect_azmanagers import Adapt, AzureScaleSetTaskRunner
from prefect_azmanagers.cluster.cluster import AzureCluster
from tests.cluster.test_engine_e2e import (
    admin,  # noqa: F401  (the module's fixture)
    assert_nothing_left,
    group_name,
    instances_of,
    sleepy,
    wait_until,
)

pytestmark = pytest.mark.e2e


class InstanceCounter:
    """The local cloud's instance count of a scale set, sampled in the background: the peak."""

    def __init__(self, admin, group: str):
        self.admin, self.group, self.peak, self._stop = admin, group, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, len(instances_of(self.admin, self.group)))

    def __enter__(self) -> "InstanceCounter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_a_bursty_workload_grows_to_the_maximum_shrinks_in_the_gap_and_grows_again(localcloud, admin):
    group = group_name("adapt")
    adapt = Adapt(minimum=0, maximum=3, idle_timeout=4, interval=0.5)
    with InstanceCounter(admin, group) as counter, AzureCluster(
            "localcloud-small", manifest="localcloud", group=group, progress=False, warm_up=None,
            join_timeout=300, adapt=adapt) as cluster:
        assert instances_of(admin, group) == []     # minimum 0: nothing before work comes
        first = [cluster.submit(lambda i=i: sleepy(i, 1.5)) for i in range(18)]
        assert [f.result(timeout=300) for f in first] == list(range(18))
        peak_first = counter.peak
        wait_until(lambda: instances_of(admin, group) == [], 120, "the shrink to the minimum")
        second = [cluster.submit(lambda i=i: sleepy(100 + i, 1.5)) for i in range(12)]
        assert [f.result(timeout=300) for f in second] == [100 + i for i in range(12)]
        usage = cluster.usage()
        addresses = {i.address for i in cluster.instances if i.address}
    assert peak_first == 3 and counter.peak == 3    # grew to the maximum, never above it
    assert usage.instances >= 4                      # grew again after the gap
    assert usage.requeued == 0                       # no call re-run because of a scale-down
    vm_seconds = {name: s for name, s in admin.counters()["instance_seconds"]["by_instance"].items()
                  if name.startswith(f"{group}_")}
    assert len(vm_seconds) == usage.instances and all(s > 0 for s in vm_seconds.values())
    assert_nothing_left(admin, group, addresses)


def test_a_scale_down_racing_dispatch_loses_nothing(localcloud, admin, caplog):
    """Calls trickle in at about the idle timeout: instances are removed while calls are being
    handed out, and none is lost or re-run."""
    caplog.set_level("INFO", logger="prefect_azmanagers.cluster")
    group = group_name("race")
    adapt = Adapt(minimum=0, maximum=2, idle_timeout=1, interval=0.2)
    with AzureCluster("localcloud-small", manifest="localcloud", group=group, progress=False, warm_up=None,
                      join_timeout=300, adapt=adapt) as cluster:
        warm = [cluster.submit(lambda k=k: sleepy(k, 0.5)) for k in range(4)]
        assert [f.result(timeout=300) for f in warm] == list(range(4))  # both instances up
        futures = []
        for i in range(12):  # idle just past the timeout between rounds: removals race submits
            futures += [cluster.submit(lambda i=i, k=k: (i, k)) for k in range(2)]
            time.sleep(1.3)
        assert [f.result(timeout=300) for f in futures] == [(i, k) for i in range(12) for k in range(2)]
        usage = cluster.usage()
    assert usage.requeued == 0
    scale_downs = [r.getMessage() for r in caplog.records
                   if r.getMessage().startswith("scaling ") and "idle for" in r.getMessage()]
    assert scale_downs, "no scale-down raced the dispatch"  # the race did happen
    assert_nothing_left(admin, group, set())


def test_adapt_turns_a_fixed_cluster_adaptive(localcloud, admin, caplog):
    """`AzureCluster.adapt(...)` on a running fixed cluster: it grows with the work (saying
    why, counting tasks), then gives idle instances back down to the minimum."""
    caplog.set_level("INFO", logger="prefect_azmanagers.cluster")
    group = group_name("adaptcall")
    with InstanceCounter(admin, group) as counter, AzureCluster(
            "localcloud-small", 1, manifest="localcloud", group=group, progress=False, warm_up=None,
            join_timeout=300, waitfor=True) as cluster:
        futures = [cluster.submit(lambda i=i: sleepy(i, 1.0)) for i in range(10)]
        cluster.adapt(minimum=0, maximum=2, idle_timeout=2, interval=0.5)  # with work queued
        assert [f.result(timeout=300) for f in futures] == list(range(10))
        wait_until(lambda: instances_of(admin, group) == [], 120, "the shrink to the minimum")
    assert counter.peak == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scaling ")]
    assert any(line.startswith("scaling 1 -> 2 instances: ") and "tasks queued" in line
               for line in lines), lines
    assert_nothing_left(admin, group, set())


def test_the_quota_caps_growth_instead_of_failing_it(localcloud, admin, caplog):
    """Room in the regional quota for two instances, a maximum of four: the cluster grows to
    two, says the quota caps it, and runs every task there (the failsafe is not tripped)."""
    caplog.set_level("INFO", logger="prefect_azmanagers.cluster")
    group = group_name("aquota")
    before = admin.set_quota("cores", 10_000)
    used = before["usage"].get("cores", 0)
    admin.set_quota("cores", used + 2 * 2)  # Standard_D2s_v3: 2 vCPUs each
    try:
        with InstanceCounter(admin, group) as counter, AzureCluster(
                "localcloud-small", manifest="localcloud", group=group, progress=False, warm_up=None,
                join_timeout=300, adapt=Adapt(minimum=0, maximum=4, idle_timeout=60,
                                              interval=0.5)) as cluster:
            futures = [cluster.submit(lambda i=i: sleepy(i, 1.0)) for i in range(16)]
            assert [f.result(timeout=300) for f in futures] == list(range(16))
    finally:
        admin.set_quota("cores", before["quotas"].get("cores", 10_000))
    assert counter.peak == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("the quota caps this cluster at 2 instances" in m and "cores: limit" in m
               for m in messages), messages
    assert not any("not scaling up any more" in m for m in messages)
    assert_nothing_left(admin, group, set())


def test_max_instance_hours_stops_growth_and_says_so(localcloud, admin, caplog):
    """Past its instance-hour budget the cluster adds nothing (it says so once) and finishes
    the work on the instances it has."""
    caplog.set_level("INFO", logger="prefect_azmanagers.cluster")
    group = group_name("abudget")
    adapt = Adapt(minimum=0, maximum=3, idle_timeout=600, interval=0.5,
                  max_instance_hours=2 / 3600)  # two instance-seconds
    with InstanceCounter(admin, group) as counter, AzureCluster(
            "localcloud-small", manifest="localcloud", group=group, progress=False, warm_up=None,
            join_timeout=300, adapt=adapt) as cluster:
        assert cluster.submit(lambda: sleepy(0, 3.0)).result(timeout=300) == 0  # one instance
        futures = [cluster.submit(lambda i=i: sleepy(i, 0.5)) for i in range(12)]
        assert [f.result(timeout=300) for f in futures] == list(range(12))
        usage = cluster.usage()
    assert counter.peak == 1 and usage.instances == 1
    told = [r.getMessage() for r in caplog.records if "not scaling up" in r.getMessage()]
    assert len(told) == 1 and "max_instance_hours=0.000555556 used" in told[0], told
    assert_nothing_left(admin, group, set())


@task
def square(x: int) -> int:
    time.sleep(0.5)
    return x * x


def test_the_runner_reports_usage_as_an_artifact(localcloud, admin, prefect_server):
    group = group_name("report")

    @flow(task_runner=AzureScaleSetTaskRunner(
        "localcloud-small", manifest="localcloud", group=group, join_timeout=300,
        adapt=Adapt(minimum=0, maximum=2, idle_timeout=30, interval=0.5)))
    def bursty():
        return sum(square.map(range(8)).result())

    state = bursty(return_state=True)
    assert state.result() == sum(x * x for x in range(8))
    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_artifacts() if a.key == "azmanagers-usage"
                     and a.flow_run_id == state.state_details.flow_run_id]
    assert len(artifacts) == 1
    table = artifacts[0].data
    assert "| instances used | 2 |" in table and "| evictions | 0 |" in table
    assert "| re-queued calls | 0 |" in table and "| peak workers | 2 |" in table
    assert_nothing_left(admin, group, set())
    # `prefect-azmanagers usage` prints the same for the flow's cluster
    from typer.testing import CliRunner

    from prefect_azmanagers.cli import app
    printed = CliRunner().invoke(app, ["usage", group, "--json"])
    assert printed.exit_code == 0, printed.output
    [record] = json.loads(printed.output)
    assert record["group"] == group and record["usage"]["instances"] == 2
    assert record["usage"]["peak_workers"] == 2 and record["usage"]["requeued"] == 0
    assert CliRunner().invoke(app, ["usage", group]).exit_code == 0  # the table (at its width)


def evict(cluster: AzureCluster, instance: str) -> None:
    """ARM's simulateEviction on one of the cluster's instances (the real SDK call)."""
    cluster.simulate_eviction(instance)


def test_an_eviction_during_a_burst_is_replaced_and_one_during_idle_is_not(localcloud, admin):
    group = group_name("aspot")
    admin.settings(eviction_notice=5)
    try:
        adapt = Adapt(minimum=0, maximum=2, idle_timeout=600, interval=0.5)
        with AzureCluster("localcloud-small", manifest="localcloud", group=group, spot=True,
                          progress=False, warm_up=None, join_timeout=300, adapt=adapt) as cluster:
            futures = [cluster.submit(lambda i=i: sleepy(i, 3)) for i in range(16)]
            wait_until(lambda: len({w.instance for w in cluster.workers}) == 2, 300, "2 instances")
            victim = cluster.workers[0].instance
            evict(cluster, victim)
            assert [f.result(timeout=300) for f in futures] == list(range(16))
            # during the burst the evicted instance was replaced
            assert cluster.usage().instances == 3 and cluster.usage().evictions == 1, cluster.instances
            wait_until(lambda: len(cluster.workers) == 2, 300, "the replacement joined")
            # idle now (idle_timeout is long): an eviction is not replaced
            idle_victim = cluster.workers[0].instance
            evict(cluster, idle_victim)
            wait_until(lambda: idle_victim not in {w.instance for w in cluster.workers}, 120,
                       "the idle instance evicted")
            time.sleep(3)  # several decisions: none grows
            usage = cluster.usage()
            assert usage.instances == 3 and usage.evictions == 2
            assert len(instances_of(admin, group)) == 1
    finally:
        admin.settings(eviction_notice=30)
    assert_nothing_left(admin, group, set())


def test_after_repeated_evictions_spot_fallback_adds_regular_instances(localcloud, admin, caplog):
    group = group_name("fallback")
    admin.settings(eviction_notice=5)
    try:
        with AzureCluster("localcloud-small", 1, manifest="localcloud", group=group, spot=True,
                          spot_fallback=True, spot_fallback_after=1, progress=False, warm_up=None,
                          join_timeout=300, waitfor=True) as cluster:
            first = cluster.workers[0].instance
            futures = [cluster.submit(lambda i=i: sleepy(i, 2)) for i in range(6)]
            evict(cluster, first)
            assert [f.result(timeout=300) for f in futures] == list(range(6))
            wait_until(lambda: any(w.instance.startswith(f"{group}-regular") for w in cluster.workers),
                       300, "a regular replacement")
            usage = cluster.usage()
    finally:
        admin.settings(eviction_notice=30)
    assert usage.evictions == 1 and set(usage.instance_hours) == {"Spot", "Regular"}
    assert any("new instances are regular priority from now on" in r.getMessage()
               for r in caplog.records)
    assert_nothing_left(admin, group, set())
    assert_nothing_left(admin, f"{group}-regular", set())
