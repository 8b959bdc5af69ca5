"""Spot eviction as ARM's simulateEviction triggers it: a Preempt scheduled event visible in the
instance's IMDS first, then the instance leaves the VM and NIC lists (evictionPolicy Delete) or
is deallocated (Deallocate); an early StartRequests approval evicts at once."""

from __future__ import annotations

import json
import time

import pytest
from arm_harness import Cloud, nic_body, unique, vm_body
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

SPOT = dict(priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -1})
EVENTS = "curl -s -H Metadata:true 'http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01'"


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _members(cloud: Cloud, name: str) -> dict[str, str]:
    """instanceId -> private IP of a Uniform scale set, from the NIC list."""
    return {n.virtual_machine.id.rsplit("/", 1)[-1]: n.ip_configurations[0].private_ip_address
            for n in cloud.network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(cloud.rg, name)}


def test_preempt_is_visible_in_imds_before_the_instance_disappears(cloud: Cloud):
    name = unique("evict")
    cloud.admin.settings(eviction_notice=6)
    cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, cloud.scale_set_body(2, **SPOT)).result()
    try:
        ip = _members(cloud, name)["0"]
        assert json.loads(cloud.ssh(ip, EVENTS).stdout)["Events"] == []
        cloud.compute.virtual_machine_scale_set_vms.simulate_eviction(cloud.rg, name, "0")
        doc = json.loads(cloud.ssh(ip, EVENTS).stdout)
        [event] = doc["Events"]
        assert event["EventType"] == "Preempt" and event["EventStatus"] == "Scheduled"
        assert event["ResourceType"] == "VirtualMachine" and event["Resources"] == [f"{name}_0"]
        assert event["NotBefore"].endswith("GMT")
        # still there while the notice runs
        assert "0" in _members(cloud, name)
        assert cloud.compute.virtual_machine_scale_set_vms.get(cloud.rg, name, "0").provisioning_state == "Succeeded"
        _wait(lambda: "0" not in _members(cloud, name), 60, "the evicted instance's NIC to go")
        assert [vm.instance_id for vm in cloud.compute.virtual_machine_scale_set_vms.list(cloud.rg, name)] == ["1"]
        with pytest.raises(ResourceNotFoundError):
            cloud.compute.virtual_machine_scale_set_vms.get(cloud.rg, name, "0")
        assert cloud.compute.virtual_machine_scale_sets.get(cloud.rg, name).sku.capacity == 1
        assert cloud.ssh(ip, "true", timeout=30).returncode == 255

        # an approved event (StartRequests) evicts without waiting for NotBefore
        cloud.admin.settings(eviction_notice=600)
        ip1 = _members(cloud, name)["1"]
        cloud.compute.virtual_machine_scale_set_vms.simulate_eviction(cloud.rg, name, "1")
        event_id = json.loads(cloud.ssh(ip1, EVENTS).stdout)["Events"][0]["EventId"]
        # in the background: the approval evicts at once, which may cut this very SSH session
        approve = cloud.ssh(ip1, "nohup curl -s -X POST -H Metadata:true -d "
                                 f"'{{\"StartRequests\": [{{\"EventId\": \"{event_id}\"}}]}}' "
                                 "'http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01' "
                                 ">/dev/null 2>&1 &")
        assert approve.returncode == 0, approve.stderr
        _wait(lambda: not _members(cloud, name), 60, "the approved eviction")
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()


def test_deallocate_policy_keeps_the_vm_deallocated(cloud: Cloud):
    name = unique("dealloc")
    cloud.admin.settings(eviction_notice=1)
    nic = cloud.network.network_interfaces.begin_create_or_update(cloud.rg, f"{name}-nic", nic_body(cloud)).result()
    body = vm_body(cloud, nic.id, name, priority="Spot", evictionPolicy="Deallocate", billingProfile={"maxPrice": -1})
    cloud.compute.virtual_machines.begin_create_or_update(cloud.rg, name, body).result()
    try:
        cloud.compute.virtual_machines.simulate_eviction(cloud.rg, name)
        _wait(lambda: cloud.compute.virtual_machines.instance_view(cloud.rg, name).statuses[-1].code
              == "PowerState/deallocated", 60, "deallocation")
        vm = cloud.compute.virtual_machines.get(cloud.rg, name)
        assert vm.priority == "Spot" and vm.eviction_policy == "Deallocate"
    finally:
        cloud.compute.virtual_machines.begin_delete(cloud.rg, name).result()
    with pytest.raises(ResourceNotFoundError):
        cloud.network.network_interfaces.get(cloud.rg, f"{name}-nic")


def test_simulate_eviction_needs_a_spot_vm(cloud: Cloud):
    name = unique("regular")
    cloud.compute.virtual_machine_scale_sets.begin_create_or_update(cloud.rg, name, cloud.scale_set_body(1)).result()
    try:
        with pytest.raises(ResourceExistsError) as info:
            cloud.compute.virtual_machine_scale_set_vms.simulate_eviction(cloud.rg, name, "0")
        assert info.value.error.code == "OperationNotAllowed"
    finally:
        cloud.compute.virtual_machine_scale_sets.begin_delete(cloud.rg, name).result()
