"""Standalone VMs and NICs (what detached VMs use), and Flexible scale sets with a priority mix,
through the real Azure SDK."""

from __future__ import annotations

import asyncio

import pytest
from arm_harness import Cloud, nic_body, unique, vm_body
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError


def test_vm_and_nic_lifecycle_sync(cloud: Cloud):
    name = unique("vm")
    nic = cloud.network.network_interfaces.begin_create_or_update(cloud.rg, f"{name}-nic", nic_body(cloud)).result()
    assert nic.provisioning_state == "Succeeded" and nic.ip_configurations[0].private_ip_address
    assert nic.virtual_machine is None
    vm = cloud.compute.virtual_machines.begin_create_or_update(cloud.rg, name, vm_body(cloud, nic.id, name)).result()
    assert vm.provisioning_state == "Succeeded" and vm.vm_id and vm.tags == {"purpose": "detached"}
    assert vm.os_profile.custom_data is None
    view = cloud.compute.virtual_machines.instance_view(cloud.rg, name)
    assert [s.code for s in view.statuses] == ["ProvisioningState/succeeded", "PowerState/running"]
    attached = cloud.network.network_interfaces.get(cloud.rg, f"{name}-nic")
    assert attached.virtual_machine.id.lower() == vm.id.lower()
    ip = attached.ip_configurations[0].private_ip_address
    out = cloud.ssh(ip, "hostname; echo $HOME")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [name, "/home/azureuser"]

    with pytest.raises(HttpResponseError) as info:
        cloud.network.network_interfaces.begin_delete(cloud.rg, f"{name}-nic")
    assert info.value.error.code == "NicInUse"

    cloud.compute.virtual_machines.begin_delete(cloud.rg, name).result()
    with pytest.raises(ResourceNotFoundError):
        cloud.compute.virtual_machines.get(cloud.rg, name)
    with pytest.raises(ResourceNotFoundError):  # deleteOption Delete took the NIC along
        cloud.network.network_interfaces.get(cloud.rg, f"{name}-nic")
    assert cloud.ssh(ip, "true", timeout=30).returncode == 255


def test_vm_nic_detach_and_missing_nic_aio(cloud: Cloud):
    name = unique("avm")

    async def scenario():
        compute, network = cloud.aio_clients()
        async with compute, network:
            missing = f"/subscriptions/{cloud.info['subscription_id']}/resourceGroups/{cloud.rg}/providers/" \
                      "Microsoft.Network/networkInterfaces/does-not-exist"
            with pytest.raises(HttpResponseError) as info:
                await compute.virtual_machines.begin_create_or_update(cloud.rg, name, vm_body(cloud, missing, name))
            assert info.value.error.code == "InvalidResourceReference"

            nic = await (await network.network_interfaces.begin_create_or_update(
                cloud.rg, f"{name}-nic", nic_body(cloud))).result()
            vm = await (await compute.virtual_machines.begin_create_or_update(
                cloud.rg, name, vm_body(cloud, nic.id, name, delete_option="Detach"))).result()
            assert vm.provisioning_state == "Succeeded"
            listed = [v.name async for v in compute.virtual_machines.list(cloud.rg)]
            assert name in listed
            await (await compute.virtual_machines.begin_delete(cloud.rg, name)).result()
            kept = await network.network_interfaces.get(cloud.rg, f"{name}-nic")
            assert kept.virtual_machine is None and kept.ip_configurations[0].private_ip_address
            await (await network.network_interfaces.begin_delete(cloud.rg, f"{name}-nic")).result()
            with pytest.raises(ResourceNotFoundError):
                await network.network_interfaces.get(cloud.rg, f"{name}-nic")

    asyncio.run(scenario())


def test_flexible_scale_set_with_priority_mix(cloud: Cloud):
    name = unique("flex")
    body = cloud.scale_set_body(
        5, orchestrationMode="Flexible", priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -1},
        properties={"priorityMixPolicy": {"baseRegularPriorityCount": 1, "regularPriorityPercentageAboveBase": 50}},
    )
    body["properties"]["virtualMachineProfile"]["networkProfile"]["networkApiVersion"] = "2020-11-01"
    ss = cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, body).result()
    try:
        assert ss.orchestration_mode == "Flexible" and ss.provisioning_state == "Succeeded"
        vms = list(cloud.compute.virtual_machines.list(cloud.rg, filter=f"'virtualMachineScaleSet/id' eq '{ss.id}'"))
        assert len(vms) == 5
        assert all(vm.virtual_machine_scale_set.id.lower() == ss.id.lower() for vm in vms)
        # base 1 regular, then 50% of the 4 above base: 3 regular, 2 spot
        assert sorted(vm.priority for vm in vms) == ["Regular"] * 3 + ["Spot"] * 2
        vm_ids = {vm.id.lower() for vm in vms}
        nics = [n for n in cloud.network.network_interfaces.list(cloud.rg)
                if n.virtual_machine and n.virtual_machine.id.lower() in vm_ids]
        assert len(nics) == 5 and all(n.ip_configurations[0].private_ip_address for n in nics)
        with pytest.raises(HttpResponseError) as info:  # Uniform-only API, as on Azure
            list(cloud.compute.virtual_machine_scale_set_vms.list(cloud.rg, name))
        assert info.value.error.code == "OperationNotAllowed"
        victim = vms[0].name
        cloud.compute.virtual_machine_scale_sets.begin_delete_instances(cloud.rg, name, {"instanceIds": [victim]}).result()
        left = {vm.name for vm in cloud.compute.virtual_machines.list(
            cloud.rg, filter=f"'virtualMachineScaleSet/id' eq '{ss.id}'")}
        assert len(left) == 4 and victim not in left
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()
    assert not [vm for vm in cloud.compute.virtual_machines.list(cloud.rg) if vm.name.startswith(name)]
