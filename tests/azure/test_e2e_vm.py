"""Standalone VM + NIC end to end on the local cloud: create, read, list, delete, no leaks."""

from __future__ import annotations

import asyncio
import re

import pytest
from azure.core.exceptions import ResourceNotFoundError

from prefect_azmanagers.azure.ownership import CLUSTER_TAG, ownership_tags
from prefect_azmanagers.azure.vm import create_vm, delete_vm, get_vm, list_vms, vm_name
from prefect_azmanagers.exceptions import AllocationFailed, ResourceMissing

pytestmark = pytest.mark.e2e


def test_vm_name_like_the_original():
    names = {vm_name("cbox") for _ in range(50)}
    assert all(re.fullmatch(r"cbox-[a-z]{6}", n) for n in names) and len(names) > 45


def test_vm_and_nic_create_read_list_delete(lc):
    async def scenario(clients):
        name = vm_name(lc.prefix)
        try:
            info = await create_vm(clients, lc.manifest, lc.vmtemplate, lc.nictemplate, name,
                                   custom_data=lc.custom_data(), tags=ownership_tags(lc.prefix, kind="detached"))
            assert info.name == name and info.nic_name == f"{name}-nic"
            assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", info.private_ip) and info.vm_id
            assert info.tags[CLUSTER_TAG] == lc.prefix
            vm = (await clients.compute.virtual_machines.get(info.resource_group, name)).as_dict()
            props = vm["properties"]
            assert props["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
            assert props["networkProfile"]["networkInterfaces"][0]["properties"]["deleteOption"] == "Delete"
            assert await get_vm(clients, info.resource_group, name) == info
            listed = await list_vms(clients, info.resource_group, tag_filter={CLUSTER_TAG: lc.prefix})
            assert [v.name for v in listed] == [name]
            assert listed[0].private_ip == info.private_ip
            status = {i["name"]: i for i in lc.admin.status()["instances"]}
            assert status[name]["private_ip"] == info.private_ip
        finally:
            await delete_vm(clients, lc.manifest.resource_group, name)
        with pytest.raises(ResourceMissing):
            await get_vm(clients, lc.manifest.resource_group, name)
        with pytest.raises(ResourceNotFoundError):     # the NIC went with the VM
            await clients.network.network_interfaces.get(lc.manifest.resource_group, f"{name}-nic")
        await delete_vm(clients, lc.manifest.resource_group, name)   # idempotent
    lc.run(scenario)


def test_vm_allocation_failure_leaks_nothing(lc):
    async def scenario(clients):
        lc.admin.fail_next_lro(1)
        with pytest.raises(AllocationFailed, match="AllocationFailed|capacity"):
            await create_vm(clients, lc.manifest, lc.vmtemplate, lc.nictemplate, vm_name(lc.prefix),
                            custom_data=lc.custom_data(), tags=ownership_tags(lc.prefix))
        # the fixture checks that neither the VM nor its NIC is left
    lc.run(scenario)


def test_vm_creation_cancelled_midway_leaks_nothing(lc):
    """Cancelling create_vm (what Ctrl-C does to an asyncio task) while the VM boots deletes VM and NIC."""
    lc.admin.settings(boot_delay=5)

    async def scenario(clients):
        name = vm_name(lc.prefix)
        task = asyncio.create_task(create_vm(clients, lc.manifest, lc.vmtemplate, lc.nictemplate, name,
                                             custom_data=lc.custom_data(), tags=ownership_tags(lc.prefix)))
        for _ in range(600):
            status = await asyncio.to_thread(lc.admin.status)
            if any(i["name"] == name for i in status["instances"]):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the VM was never requested")
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    try:
        lc.run(scenario)
    finally:
        lc.admin.settings(boot_delay=0)
    # the fixture checks that neither the VM nor its NIC is left
