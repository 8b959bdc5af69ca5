"""A worker that cannot start again never takes healthy work down with it (issue 11).

An instance's agent joined, then died, and every restart fails there (as after a broken
environment): the instance counts as lost, its calls run on the healthy instance, and it is
deleted. With nothing usable left or coming, the remaining calls fail at once with the agent's
stderr tail, instead of hanging while the VMs bill.
"""

from __future__ import annotations

import time

import pytest

from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.exceptions import WorkerLost
from tests.cluster.test_engine_e2e import (
    admin,  # noqa: F401  (the module's fixture)
    assert_nothing_left,
    group_name,
    instances_of,
    on_instance,
    sleepy,
    wait_until,
)

pytestmark = pytest.mark.e2e

# A module in the agent's working directory (its home) that shadows one it imports: every new
# agent on that instance exits before it starts, as with a broken environment.
BREAK_AND_KILL = ("printf 'raise ImportError(\"a broken environment on this instance\")\\n' "
                  "> ~/cloudpickle.py && kill -KILL -- -{pgid}")


def test_an_instance_whose_agents_cannot_restart_is_lost_and_its_work_runs_elsewhere(localcloud, admin):
    group = group_name("crash")
    with AzureCluster("localcloud-small", 2, manifest="localcloud", group=group, progress=False, warm_up=None,
                      join_timeout=300, waitfor=True, max_replacements=0) as cluster:
        addresses = {w.ip for w in cluster.workers}
        futures = [cluster.submit(lambda i=i: sleepy(i, 1)) for i in range(12)]
        wait_until(lambda: sum(w.state == "busy" for w in cluster.workers) == 2, 60, "2 busy workers")
        victim = cluster.workers[0]
        on_instance(victim.ip, BREAK_AND_KILL.format(pgid=victim.pid))
        # every call completes, on the healthy instance; the broken one is deleted
        assert [f.result(timeout=120) for f in futures] == list(range(12))
        wait_until(lambda: victim.instance not in {w.instance for w in cluster.workers}, 60,
                   "the broken instance given up")
        wait_until(lambda: len(instances_of(admin, group)) == 1, 60, "the broken instance deleted")
        healthy = cluster.workers[0]
        assert healthy.instance != victim.instance and healthy.tasks_run >= 11

        # nothing usable left or coming: the queue fails at once, with the agent's stderr
        futures = [cluster.submit(lambda i=i: sleepy(i, 2)) for i in range(4)]
        wait_until(lambda: any(w.state == "busy" for w in cluster.workers), 60, "a busy worker")
        started = time.monotonic()
        on_instance(healthy.ip, BREAK_AND_KILL.format(pgid=healthy.pid))
        for future in futures:
            with pytest.raises(WorkerLost) as lost:
                future.result(timeout=120)
            assert "a broken environment on this instance" in str(lost.value)
        elapsed = time.monotonic() - started
        print(f"crash loop on the last instance: {lost.value}\nthe queue failed after {elapsed:.1f} s")
        assert elapsed < 120
        pids = {victim.pid, healthy.pid}
    assert_nothing_left(admin, group, addresses, pids)


def test_an_instance_that_reconnects_into_a_broken_environment_is_lost_not_left_joined(localcloud, admin):
    """Its SSH connection drops, the reconnect works, but no agent can start there any more:
    the slot is restarted up to the bound, then given up and the instance lost, so the queue
    fails with the agent's stderr instead of waiting for a joined instance that runs nothing."""
    group = group_name("reconnect")
    with AzureCluster("localcloud-small", 1, manifest="localcloud", group=group, progress=False, warm_up=None,
                      join_timeout=300, waitfor=True, max_replacements=0) as cluster:
        [victim] = cluster.workers
        addresses = {victim.ip}
        on_instance(victim.ip, BREAK_AND_KILL.split(" && ")[0])  # break, leave the agent running
        admin.drop_ssh(victim.instance)  # its agent ends with the connection
        futures = [cluster.submit(lambda i=i: sleepy(i, 1)) for i in range(3)]
        started = time.monotonic()
        for future in futures:
            with pytest.raises(WorkerLost) as lost:
                future.result(timeout=180)
            assert "a broken environment on this instance" in str(lost.value)
        print(f"reconnect into a broken environment: the queue failed after "
              f"{time.monotonic() - started:.1f} s")
        wait_until(lambda: not instances_of(admin, group), 60, "the broken instance deleted")
        pids = {victim.pid}
    assert_nothing_left(admin, group, addresses, pids)
