"""Scale sets through the real Azure SDK (sync and aio clients), against the local cloud."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess

import pytest
from azure.core.exceptions import ResourceNotFoundError

from arm_harness import PAGE_SIZE, Cloud, unique

MARKER_SCRIPT = "#!/bin/bash\necho booted-by-customdata\ntouch /home/azureuser/marker-$(hostname)\n"


def _codes(vm) -> list[str]:
    return [s.code for s in vm.instance_view.statuses]


def test_scale_set_lifecycle_sync(cloud: Cloud):
    name = unique("life")
    compute, network, rg = cloud.compute, cloud.network, cloud.rg
    created = compute.virtual_machine_scale_sets.begin_create_or_update(rg, name, cloud.scale_set_body(2)).result()
    assert created.provisioning_state == "Succeeded"
    assert created.sku.capacity == 2 and created.unique_id and created.orchestration_mode == "Uniform"

    vms = list(compute.virtual_machine_scale_set_vms.list(rg, name, expand="instanceView"))
    assert sorted(vm.instance_id for vm in vms) == ["0", "1"]
    for vm in vms:
        assert vm.name == f"{name}_{vm.instance_id}"
        assert vm.os_profile.computer_name == "conf" + vm.instance_id.rjust(6, "0")
        assert vm.provisioning_state == "Succeeded"
        assert _codes(vm) == ["ProvisioningState/succeeded", "PowerState/running"]
    one = compute.virtual_machine_scale_set_vms.get(rg, name, "1")
    assert one.vm_id == next(vm.vm_id for vm in vms if vm.instance_id == "1")
    view = compute.virtual_machine_scale_set_vms.get_instance_view(rg, name, "1")
    assert [s.code for s in view.statuses][-1] == "PowerState/running"
    ss_view = compute.virtual_machine_scale_sets.get_instance_view(rg, name)
    assert {s.code: s.count for s in ss_view.virtual_machine.statuses_summary} == {"ProvisioningState/succeeded": 2}

    nics = list(network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(rg, name))
    ips = {nic.virtual_machine.id.rsplit("/", 1)[-1]: nic.ip_configurations[0].private_ip_address for nic in nics}
    assert sorted(ips) == ["0", "1"] and len(set(ips.values())) == 2

    grown = compute.virtual_machine_scale_sets.begin_update(rg, name, {"sku": {"capacity": 3}}).result()
    assert grown.sku.capacity == 3
    assert sorted(vm.instance_id for vm in compute.virtual_machine_scale_set_vms.list(rg, name)) == ["0", "1", "2"]

    compute.virtual_machine_scale_sets.begin_delete_instances(rg, name, {"instanceIds": ["0"]}).result()
    compute.virtual_machine_scale_set_vms.begin_delete(rg, name, "2").result()
    left = list(compute.virtual_machine_scale_set_vms.list(rg, name))
    assert [vm.instance_id for vm in left] == ["1"]
    assert compute.virtual_machine_scale_sets.get(rg, name).sku.capacity == 1
    with pytest.raises(ResourceNotFoundError):
        compute.virtual_machine_scale_set_vms.get(rg, name, "0")
    assert len(list(network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(rg, name))) == 1

    compute.virtual_machine_scale_sets.begin_delete(rg, name, force_deletion=True).result()
    with pytest.raises(ResourceNotFoundError) as info:
        compute.virtual_machine_scale_sets.get(rg, name)
    assert info.value.error.code == "ResourceNotFound"
    assert cloud.admin.counters()["requests"]["VirtualMachineScaleSets_CreateOrUpdate"] >= 1


def test_scale_set_lifecycle_aio(cloud: Cloud):
    name = unique("aio")

    async def scenario():
        compute, network = cloud.aio_clients()
        async with compute, network:
            poller = await compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, cloud.scale_set_body(2))
            created = await poller.result()
            assert created.provisioning_state == "Succeeded"
            vms = [vm async for vm in compute.virtual_machine_scale_set_vms.list(cloud.rg, name, expand="instanceView")]
            assert all(_codes(vm)[-1] == "PowerState/running" for vm in vms) and len(vms) == 2
            nics = [n async for n in network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(cloud.rg, name)]
            assert len({n.ip_configurations[0].private_ip_address for n in nics}) == 2
            await (await compute.virtual_machine_scale_sets.begin_update(cloud.rg, name, {"sku": {"capacity": 1}})).result()
            left = [vm.instance_id async for vm in compute.virtual_machine_scale_set_vms.list(cloud.rg, name)]
            assert left == ["0"]  # scale-in removes the highest instance ids
            await (await compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name)).result()
            with pytest.raises(ResourceNotFoundError):
                await compute.virtual_machine_scale_sets.get(cloud.rg, name)

    asyncio.run(scenario())


def test_paging_across_pages(cloud: Cloud):
    name = unique("page")
    cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, cloud.scale_set_body(5)).result()
    try:
        cloud.admin.reset_counters()
        vms = list(cloud.compute.virtual_machine_scale_set_vms.list(cloud.rg, name, expand="instanceView"))
        assert sorted(int(vm.instance_id) for vm in vms) == [0, 1, 2, 3, 4]
        nics = list(cloud.network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(cloud.rg, name))
        assert len(nics) == 5
        requests = cloud.admin.counters()["requests"]
        pages = -(-5 // PAGE_SIZE)
        assert requests["VirtualMachineScaleSetVMs_List"] == pages
        assert requests["NetworkInterfaces_ListVirtualMachineScaleSetNetworkInterfaces"] == pages
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()


def test_instances_reachable_by_ssh_custom_data_ran_and_never_echoed(cloud: Cloud, tmp_path):
    name = unique("ssh")
    custom_data = base64.b64encode(MARKER_SCRIPT.encode()).decode()
    compute = cloud.compute
    compute.virtual_machine_scale_sets.begin_create_or_update(
        cloud.rg, name, cloud.scale_set_body(1, custom_data=custom_data)).result()
    try:
        nic = next(iter(cloud.network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(cloud.rg, name)))
        ip = nic.ip_configurations[0].private_ip_address
        vm = compute.virtual_machine_scale_set_vms.get(cloud.rg, name, "0")
        out = cloud.ssh(ip, "for i in $(seq 50); do test -e ~/marker-$(hostname) && break; sleep 0.2; done; "
                            "hostname; ls ~; cat /var/log/cloud-init-output.log")
        assert out.returncode == 0, out.stderr
        assert f"marker-{vm.os_profile.computer_name}" in out.stdout or "marker-" in out.stdout
        assert "booted-by-customdata" in out.stdout
        imds = cloud.ssh(ip, "curl -s -H Metadata:true 'http://169.254.169.254/metadata/instance?api-version=2021-02-01'")
        compute_doc = json.loads(imds.stdout)["compute"]
        assert compute_doc["vmId"] == vm.vm_id and compute_doc["vmScaleSetName"] == name
        assert compute_doc["name"] == f"{name}_0"

        other_key = tmp_path / "other"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
        refused = cloud.ssh(ip, "true", key=str(other_key))
        assert refused.returncode == 255 and "Permission denied" in refused.stderr

        # customData is accepted but never returned, in any representation
        got = compute.virtual_machine_scale_sets.get(cloud.rg, name)
        assert got.virtual_machine_profile.os_profile.custom_data is None
        texts = []
        compute.virtual_machine_scale_sets.get(cloud.rg, name, cls=lambda resp, *_: texts.append(resp.http_response.text()))
        compute.virtual_machine_scale_set_vms.get(cloud.rg, name, "0", cls=lambda resp, *_: texts.append(resp.http_response.text()))
        assert texts and all(custom_data not in t and "customData" not in t for t in texts)
    finally:
        compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()


def test_scale_in_during_boot_removes_booting_instances_without_failing(cloud: Cloud):
    name = unique("slow")
    cloud.admin.settings(boot_delay=30)
    grow = cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, cloud.scale_set_body(2))
    try:
        views = [vm.instance_view.statuses[0].code for vm in
                 cloud.compute.virtual_machine_scale_set_vms.list(cloud.rg, name, expand="instanceView")]
        assert views == ["ProvisioningState/creating"] * 2  # sshd not up yet: not Succeeded
        shrink = cloud.compute.virtual_machine_scale_sets.begin_update(cloud.rg, name, {"sku": {"capacity": 0}})
        assert shrink.result().sku.capacity == 0
        assert grow.result().provisioning_state == "Succeeded"
        assert list(cloud.compute.virtual_machine_scale_set_vms.list(cloud.rg, name)) == []
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()
