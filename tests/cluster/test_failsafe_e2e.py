"""The runaway failsafe end to end (issue 11): a deterministic boot failure is not replaced
over and over. Instances lost before joining, three in a row, stop the replacements whatever
the budget left, and the queued calls then fail naming the boot failure."""

from __future__ import annotations

import time

import pytest

from prefect_azmanagers.blocks import load_scaleset_template
from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.cluster.membership import MAX_FAILURES_IN_A_ROW
from prefect_azmanagers.exceptions import WorkerLost
from tests.cluster.test_engine_e2e import (
    admin,  # noqa: F401  (the module's fixture)
    assert_nothing_left,
    group_name,
)

pytestmark = pytest.mark.e2e


def instances_ever(admin, group: str) -> list[str]:
    """Every VM of scale set `group` since the local cloud started, deleted ones included (the
    scale set lives through the run, so instance names are not reused)."""
    return sorted(name for name in admin.counters()["instance_seconds"]["by_instance"]
                  if name.startswith(f"{group}_"))


def test_a_boot_that_always_fails_is_replaced_twice_then_the_calls_fail_naming_it(localcloud, admin):
    group = group_name("failsafe")
    template = load_scaleset_template("localcloud-small").model_copy(
        update={"tempdisk": "echo preparing scratch space on purpose-fail; exit 3"})
    started = time.monotonic()
    with AzureCluster(template, 1, manifest="localcloud", group=group, progress=False, warm_up=None,
                      join_timeout=240, max_replacements=10) as cluster:
        future = cluster.submit(lambda: 42)
        with pytest.raises(WorkerLost) as lost:
            future.result(timeout=600)
        elapsed = time.monotonic() - started
        message = str(lost.value)
        print(f"failsafe: {message}\nfailed after {elapsed:.1f} s")
        assert "no worker is left to run it and none is coming" in message, message
        assert "failed: exit 3" in message and "tempdisk" in message, message
    ever = instances_ever(admin, group)
    assert len(ever) == MAX_FAILURES_IN_A_ROW, ever   # the first and two replacements, of 10 allowed
    assert_nothing_left(admin, group, set())
