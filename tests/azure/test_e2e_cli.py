"""`scalesets list|delete`, `vms list` and `cleanup` through the real CLI on the local cloud."""

from __future__ import annotations

import subprocess

import pytest
from typer.testing import CliRunner

from prefect_azmanagers.azure.ownership import PID_TAG, ownership_tags
from prefect_azmanagers.azure.vm import create_vm
from prefect_azmanagers.cli import app

pytestmark = pytest.mark.e2e


def cli(*args: str) -> str:
    """The CLI in this process (the entry point's own startup is tested in tests/foundation)."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.stdout


def dead_pid() -> str:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return str(proc.pid)


def test_list_and_cleanup_orphans(lc):
    orphan_tags = {**ownership_tags(lc.prefix), PID_TAG: dead_pid()}     # its creator has died
    live_tags = ownership_tags(lc.prefix + "live")                        # this process: alive

    async def provision(clients):
        orphan = lc.scaleset(clients, "o", tags=orphan_tags)
        live = lc.scaleset(clients, "l", tags=live_tags)
        for ss in (orphan, live):
            await ss.grow(1)
            await ss.wait_provisioned()
        await create_vm(clients, lc.manifest, lc.vmtemplate, lc.nictemplate, lc.name("v"),
                        custom_data=lc.custom_data(), tags=orphan_tags)
        nic = {**lc.nictemplate.value, "tags": orphan_tags}          # a NIC a crash left unattached
        poller = await clients.network.network_interfaces.begin_create_or_update(
            lc.manifest.resource_group, lc.name("n"), nic)
        await poller.result()
        return live

    async def delete(clients):
        live.clients = clients
        await live.delete()

    live = lc.run(provision)
    try:
        listed = cli("scalesets", "list", "--manifest", "localcloud")
        assert lc.name("o") in listed and lc.name("l") in listed
        assert lc.name("v") in cli("vms", "list", "--manifest", "localcloud")

        dry = cli("cleanup", "--manifest", "localcloud", "--older-than", "0s", "--dry-run")
        assert lc.name("o") in dry and lc.name("v") in dry and lc.name("n") in dry
        assert lc.name("l") not in dry                       # its creator (this process) is alive
        assert "Would delete" in dry
        assert {s["name"] for s in lc.admin.status()["scale_sets"]} >= {lc.name("o"), lc.name("l")}

        assert "Would delete 0" in cli("cleanup", "--manifest", "localcloud", "--older-than", "1h", "--dry-run")

        done = cli("cleanup", "--manifest", "localcloud", "--older-than", "0s")
        assert "Deleted" in done
        remaining = lc.leftovers()
        assert remaining == [f"scale set {lc.name('l')}", f"instance {lc.name('l')}_0"], remaining
        # (the fixture checks that the unattached NIC is gone too)
    finally:
        lc.run(delete)
    assert "did not exist" in cli("scalesets", "delete", lc.name("l"), "--yes", "--manifest", "localcloud")
