"""customenv on a detached VM: addproc(customenv=True) builds the driver's environment before
the VM's Prefect worker starts, and a job importing driver-only packages runs there."""

from __future__ import annotations

import pytest

from prefect_azmanagers.detached import detachat
from prefect_azmanagers.detached.vm import addproc, rmproc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def use_driver_packages() -> tuple[str, str, str]:
    import sys

    import azm_indexed
    import azm_shipped

    return azm_shipped.VALUE, azm_indexed.VALUE, sys.prefix


def test_detached_job_runs_in_the_boot_built_environment(localcloud, driver_packages):
    vm = addproc("localcloud-vm", "localcloud-nic", manifest="localcloud", basename="azmcenv",
                 customenv=True)
    try:
        job = detachat(vm, use_driver_packages)
        assert job.result(timeout=600) == ("shipped", "indexed", "/home/azureuser/.azmanagers/env")
    finally:
        rmproc(vm)
