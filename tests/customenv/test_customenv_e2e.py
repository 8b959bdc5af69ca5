"""customenv end to end on the local cloud: a flow whose task imports packages that the driver
has but the instances' base Python lacks runs with customenv=True and fails clearly without.

Two packages, both built by the test (offline): `azm_shipped` installed on the driver from a
wheel file (a local-path install: shipped inside customData) and `azm_indexed` installed by
name from a find-links directory (pinned; the instance's pip gets it from the same directory,
named by the driver's pip configuration)."""

from __future__ import annotations

import uuid

import pytest
from prefect import flow, task

from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@task
def use_driver_packages() -> tuple[str, str, str]:
    import sys

    import azm_indexed
    import azm_shipped

    return azm_shipped.VALUE, azm_indexed.VALUE, sys.prefix


def run_flow(group: str, customenv: bool):
    @flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 1, manifest="localcloud",
                                              group=group, customenv=customenv,
                                              join_timeout=600))
    def imports_driver_packages():
        return use_driver_packages.submit().result()

    return imports_driver_packages(return_state=True)


def test_task_needing_driver_packages_runs_only_with_customenv(localcloud, admin, driver_packages):
    import azm_indexed  # noqa: F401 - the driver itself has both packages
    import azm_shipped  # noqa: F401

    group = f"cenv-{uuid.uuid4().hex[:6]}"
    state = run_flow(group, customenv=True)
    assert state.is_completed(), state
    shipped, indexed, prefix = state.result()
    assert (shipped, indexed) == ("shipped", "indexed")
    assert prefix == "/home/azureuser/.azmanagers/env"

    state = run_flow(group, customenv=False)
    assert state.is_failed()
    with pytest.raises(ModuleNotFoundError, match="azm_indexed|azm_shipped"):
        state.result()
    assert [i for i in admin.status()["instances"] if i["scale_set"] == group] == []


def test_failed_install_fails_the_join_with_pips_tail(localcloud, admin):
    from prefect_azmanagers.cluster.cluster import AzureCluster
    from prefect_azmanagers.customenv import EnvironmentSpec
    from prefect_azmanagers.exceptions import JoinTimeout

    group = f"cenvfail-{uuid.uuid4().hex[:6]}"
    spec = EnvironmentSpec("test", ("azm-no-such-package==9.9",), (), ("--no-index",))
    cluster = AzureCluster("localcloud-small", 1, manifest="localcloud", group=group,
                           customenv=spec, waitfor=True, max_replacements=0, join_timeout=300,
                           progress=False)
    with pytest.raises(JoinTimeout) as info:
        cluster.start()
    cluster.close()
    message = str(info.value)
    assert "customenv: pip install failed" in message
    assert "No matching distribution found for azm-no-such-package==9.9" in message
    assert [i for i in admin.status()["instances"] if i["scale_set"] == group] == []
