"""Faults injected through the local cloud's admin API, against the real SDK and control plane."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from prefect_azmanagers.azure.bootscript import wait_until_booted
from prefect_azmanagers.exceptions import AllocationFailed, AzureError, BootFailed, QuotaExceeded

pytestmark = pytest.mark.e2e


def statuses(caplog, method: str, status: int) -> int:
    """How many ARM attempts of `method` answered `status`, from the control plane's request log."""
    return sum(1 for r in caplog.records if r.name == "prefect_azmanagers.azure"
               and r.getMessage().startswith(f"ARM {method} ") and f"-> {status} " in r.getMessage())


def test_throttling_storm_is_absorbed(lc, caplog):
    caplog.set_level(logging.DEBUG, logger="prefect_azmanagers.azure")

    async def scenario(clients, ss):
        lc.admin.throttle(8, retry_after=1)      # more than azure-core's default 3 status retries
        await ss.grow(2)
        await ss.wait_provisioned()
        assert len(await ss.instances()) == 2
    lc.run_with_scaleset(scenario)
    assert statuses(caplog, "GET", 429) + statuses(caplog, "PUT", 429) >= 8


def test_503_on_post_and_patch_is_retried(lc, caplog):
    caplog.set_level(logging.DEBUG, logger="prefect_azmanagers.azure")

    async def scenario(clients, ss):
        await ss.grow(1)
        await ss.wait_provisioned()
        lc.admin.fail_next(2, operation="VirtualMachineScaleSets_Update")
        await ss.grow(1)                         # PATCH sku.capacity
        await ss.wait_provisioned()
        instances = await ss.instances()
        assert len(instances) == 2
        lc.admin.fail_next(2, operation="VirtualMachineScaleSets_DeleteInstances")
        await ss.delete_instances([i.instance_id for i in instances])   # POST .../delete
        assert await ss.instances() == []
        assert await ss.delete_if_empty()
    lc.run_with_scaleset(scenario)
    assert statuses(caplog, "PATCH", 503) == 2
    assert statuses(caplog, "POST", 503) == 2


def test_allocation_failure_is_clear_and_leaks_nothing(lc):
    async def scenario(clients, ss):
        lc.admin.fail_next_lro(1)
        await ss.grow(2)                         # returns before the instances boot
        with pytest.raises(AllocationFailed, match="no capacity") as info:
            await ss.wait_provisioned()
        assert info.value.code == "AllocationFailed"
        assert not ss.created                    # ours, so deleted with its failed instances
        assert await ss.instances() == []
        assert not lc.leftovers()
    lc.run_with_scaleset(scenario)


def test_quota_short_names_the_numbers(lc):
    async def scenario(clients):
        async with lc.quota(clients, "cores", 3) as limit:
            ss = lc.scaleset(clients)
            with pytest.raises(QuotaExceeded) as info:
                await ss.grow(2)                     # 2 x 2 vCPUs > 3
            assert "cores: limit 3, in use 0, this request needs 4 more (short by 1)" in str(info.value)
            assert not ss.created
            # A bounded wait: the quota is raised while the grow waits for it.
            ss = lc.scaleset(clients, quota_wait=20)
            threading.Timer(1.0, lc.admin.set_quota, ("cores", limit)).start()
            async with ss:
                await ss.grow(2)
                assert ss.created
                await ss.delete()
            # And a bounded wait that runs out says so.
            lc.admin.set_quota("cores", 3)
            with pytest.raises(QuotaExceeded, match="after waiting 1 s"):
                await lc.scaleset(clients, quota_wait=1).grow(2)
    lc.run(scenario)


def test_failed_boot_script_error_has_the_cloud_init_tail(lc):
    hook = "echo 'installing the frobnicator'; echo 'frobnicator: not found' >&2; exit 3"

    async def scenario(clients, ss):
        await ss.grow(1)
        await ss.wait_provisioned()              # ARM says Succeeded, as Azure would
        [inst] = await ss.instances()
        async with await lc.ssh(inst.private_ip) as conn:
            with pytest.raises(BootFailed) as info:
                await wait_until_booted(conn, admin_username=lc.manifest.ssh_user, name=inst.name, timeout=120)
        text = str(info.value)
        assert inst.name in text and "failed: exit 3" in text and "(hook 1)" in text
        assert "installing the frobnicator" in text and "frobnicator: not found" in text
    lc.run_with_scaleset(scenario, custom_data=lc.custom_data(hooks=[hook]))


def test_provisioning_failure_is_reported_and_cleaned(lc):
    async def scenario(clients, ss):
        lc.admin.boot_fail(1)
        await ss.grow(2)
        with pytest.raises(AzureError, match="OS Provisioning|did not finish") as info:
            await ss.wait_provisioned()
        assert "Boot log of" in str(info.value)    # what could be read of the failed one
        survivors = await ss.instances()
        assert len(survivors) == 1 and survivors[0].provisioning_state == "Succeeded"
    lc.run_with_scaleset(scenario)


def test_ctrl_c_during_provisioning_deletes_everything(lc):
    script = Path(__file__).with_name("interrupted_provisioning.py")
    lc.admin.settings(boot_delay=5)   # instances are still booting when Ctrl-C arrives
    try:
        proc = subprocess.Popen([sys.executable, str(script), "localcloud", "localcloud-small", lc.name()],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ))
        try:
            first = proc.stdout.readline()
            assert first.strip() == "GROWING", first + proc.stdout.read()
            assert [s for s in lc.admin.status()["scale_sets"] if s["name"] == lc.name()]
            proc.send_signal(signal.SIGINT)
            output = proc.communicate(timeout=180)[0]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        lc.admin.settings(boot_delay=0)
    assert "PROVISIONED" not in output
    assert "deleting what this process made" in output
    assert not lc.leftovers(), output


def test_spot_quota_is_the_low_priority_one(lc):
    async def scenario(clients):
        async with lc.quota(clients, "lowPriorityCores", 2):
            with pytest.raises(QuotaExceeded, match=r"lowPriorityCores: limit 2, in use 0, this request needs 4"):
                await lc.scaleset(clients, spot=True).grow(2)
    lc.run(scenario)
