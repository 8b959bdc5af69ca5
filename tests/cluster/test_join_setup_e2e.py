"""AzureCluster.on_join: a setup call runs on every slot as it joins and after an agent
restart, before the slot takes any work, and on the slots already up when it is given to a
running cluster (the task runner's warm-up rides on it)."""

from __future__ import annotations

import os
import uuid

import pytest

from prefect_azmanagers.cluster.cluster import AzureCluster
from tests.cluster.test_engine_e2e import (
    admin,  # noqa: F401  (the module's fixture)
    assert_nothing_left,
    group_name,
    on_instance,
    wait_until,
)

pytestmark = pytest.mark.e2e


def mark_ready(tag: str) -> None:
    with open(f"/tmp/setup-{tag}-{os.getpid()}", "w") as handle:
        handle.write("ready")


def was_set_up(tag: str) -> bool:
    return os.path.exists(f"/tmp/setup-{tag}-{os.getpid()}")


def test_every_slot_runs_the_join_setup_before_work_also_after_a_restart(localcloud, admin):
    group, tag = group_name("setup"), uuid.uuid4().hex[:8]
    cluster = AzureCluster("localcloud-small", 1, manifest="localcloud", ppi=2, group=group,
                           progress=False, warm_up=None, join_timeout=300, waitfor=True)
    cluster.on_join(lambda: mark_ready(tag))
    with cluster:
        addresses = {w.ip for w in cluster.workers}
        assert all(cluster.submit(lambda: was_set_up(tag)).result(timeout=60) for _ in range(8))
        killed = cluster.workers[0]
        on_instance(killed.ip, f"kill -KILL -- -{killed.pid}")
        wait_until(lambda: len({w.pid for w in cluster.workers if w.state == "idle"} - {killed.pid}) == 2,
                   120, "the slot restarted")
        assert all(cluster.submit(lambda: was_set_up(tag)).result(timeout=60) for _ in range(8))
        assert sum(w.tasks_run for w in cluster.workers) == 16  # setups are not tasks
        # A new setup on the running cluster reaches the slots already up before their next call.
        later = uuid.uuid4().hex[:8]
        cluster.on_join(lambda: mark_ready(later))
        assert all(cluster.submit(lambda: was_set_up(later)).result(timeout=60) for _ in range(8))
    assert_nothing_left(admin, group, addresses)
