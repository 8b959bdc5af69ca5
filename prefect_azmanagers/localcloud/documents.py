"""The ARM documents of the local cloud's resources (scale sets, VMs, NICs, instance views, async
operations), shaped field by field as Azure's (docs/localcloud.md; tests/localcloud/test_conformance.py)."""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from pathlib import Path
from typing import Any

from prefect_azmanagers.localcloud.models import Instance, Nic, Operation, ScaleSet

def status_entry(code: str, display: str, level: str = "Info", **extra: Any) -> dict[str, Any]:
    """One entry of an instance view's statuses."""
    return {"code": code, "level": level, "displayStatus": display, **extra}


_POWER_DISPLAY = {"starting": "VM starting", "running": "VM running", "stopped": "VM stopped",
                  "deallocated": "VM deallocated"}


def instance_view(inst: Instance) -> dict[str, Any]:
    statuses = []
    if inst.power_state == "deleting":
        statuses.append(status_entry("ProvisioningState/deleting", "Deleting"))
    elif inst.provisioning_state == "Failed" and inst.error:
        statuses.append(status_entry(f"ProvisioningState/failed/{inst.error['code']}", "Provisioning failed",
                                "Error", message=inst.error["message"]))
    else:
        statuses.append(status_entry(f"ProvisioningState/{inst.provisioning_state.lower()}",
                                f"Provisioning {inst.provisioning_state.lower()}"))
    if inst.power_state in _POWER_DISPLAY:
        statuses.append(status_entry(f"PowerState/{inst.power_state}", _POWER_DISPLAY[inst.power_state]))
    statuses[0]["time"] = inst.time_created
    if inst.power_state == "running":
        agent = status_entry("ProvisioningState/succeeded", "Ready", message="GuestAgent is running and accepting new "
                                                                         "configurations.", time=inst.time_created)
    else:
        agent = status_entry("ProvisioningState/Unavailable", "Not Ready", "Warning", message="VM Agent is unresponsive.")
    os_name, os_version = _HOST_OS
    # a Uniform member names its scale set's (single) placement group, as recorded for scale-set VMs
    placement = {"placementGroupId": str(uuid.uuid5(uuid.NAMESPACE_URL, inst.scale_set_id.lower()))} \
        if inst.instance_id is not None and inst.scale_set_id else {}
    return {
        **placement,
        "platformUpdateDomain": 0, "platformFaultDomain": 0,
        "computerName": inst.computer_name, "osName": os_name, "osVersion": os_version,
        "vmAgent": {"vmAgentVersion": "localcloud", "statuses": [agent], "extensionHandlers": []},
        "disks": [{"name": f"{inst.name}_OsDisk_1", "statuses": [
            status_entry("ProvisioningState/succeeded", "Provisioning succeeded", time=inst.time_created)]}],
        "hyperVGeneration": "V2",
        "statuses": statuses,
    }


def _os_release() -> tuple[str, str]:
    """(ID, VERSION_ID) of this machine's OS: an instance runs the host's (Azure reports the image's)."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            fields[key] = value.strip().strip('"')
    return fields.get("ID", "linux"), fields.get("VERSION_ID", "")


_HOST_OS = _os_release()


def _provisioning_state(inst: Instance) -> str:
    return "Deleting" if inst.power_state == "deleting" else inst.provisioning_state


def identity_doc(identity: dict[str, str] | None, tenant_id: str) -> dict[str, Any]:
    """The `identity` member of a VM / scale set document (empty when it has none)."""
    if not identity:
        return {}
    return {"identity": {"type": identity["type"], "principalId": identity["principalId"], "tenantId": tenant_id}}


def instance_doc(inst: Instance, expand_view: bool, tenant_id: str) -> dict[str, Any]:
    """A VM document: a Uniform scale set VM or a standalone/Flexible VM."""
    network = {"networkInterfaces": [
        {"id": nic_id, "properties": {"primary": n == 0}} for n, nic_id in enumerate(inst.nic_ids)]}
    props: dict[str, Any] = {
        **{k: v for k, v in inst.properties.items() if k not in ("osProfile", "networkProfile")},
        "vmId": inst.vm_id,
        "provisioningState": _provisioning_state(inst),
        "timeCreated": inst.time_created,
        "hardwareProfile": {"vmSize": inst.size},
        "osProfile": {**{k: v for k, v in inst.properties.get("osProfile", {}).items() if k != "customData"},
                      "computerName": inst.computer_name, "adminUsername": inst.admin_username},
        "networkProfile": inst.properties.get("networkProfile") if inst.scale_set_id is None else network,
    }
    doc: dict[str, Any] = {"name": inst.name, "id": inst.id, "location": inst.location, "tags": inst.tags,
                           "etag": compute_etag(inst.generation)}
    if inst.instance_id is not None:
        doc |= {"instanceId": inst.instance_id, "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
                "sku": {"name": inst.size, "tier": "Standard"}}
        props |= {"latestModelApplied": True, "modelDefinitionApplied": "VirtualMachineScaleSet"}
    else:
        doc["type"] = "Microsoft.Compute/virtualMachines"
        doc |= identity_doc(inst.identity, tenant_id)
        props["priority"] = inst.priority
        if inst.is_spot:
            props["evictionPolicy"] = inst.eviction_policy or "Deallocate"
            props["billingProfile"] = {"maxPrice": inst.max_price if inst.max_price is not None else -1}
        if inst.scale_set_id:
            props["virtualMachineScaleSet"] = {"id": inst.scale_set_id}
    if expand_view:
        props["instanceView"] = instance_view(inst)
    doc["properties"] = props
    return doc


def scale_set_doc(ss: ScaleSet, tenant_id: str) -> dict[str, Any]:
    return {
        "id": ss.id, "name": ss.name, "type": "Microsoft.Compute/virtualMachineScaleSets",
        "location": ss.location, "tags": ss.tags, "sku": dict(ss.sku), "etag": compute_etag(ss.generation),
        **identity_doc(ss.identity, tenant_id),
        "properties": {**ss.properties, "provisioningState": ss.provisioning_state,
                       "uniqueId": ss.unique_id, "timeCreated": ss.time_created,
                       "orchestrationMode": ss.orchestration_mode},
    }


def nic_doc(nic: Nic) -> dict[str, Any]:
    ip_configs = []
    for n, ipc in enumerate(nic.properties.get("ipConfigurations", [])):
        ip_props = {k: v for k, v in (ipc.get("properties") or {}).items()}
        ip_props |= {"privateIPAllocationMethod": ip_props.get("privateIPAllocationMethod", "Dynamic"),
                     "privateIPAddressVersion": "IPv4", "primary": n == 0, "provisioningState": "Succeeded"}
        if n == 0:
            ip_props["privateIPAddress"] = nic.private_ip
        ip_config = {"id": f"{nic.id}/ipConfigurations/{ipc['name']}", "name": ipc["name"], "etag": nic_etag(nic)}
        if nic.scale_set_id is None:
            ip_config["type"] = "Microsoft.Network/networkInterfaces/ipConfigurations"
        ip_configs.append(ip_config | {"properties": ip_props})
    props = {"dnsSettings": {"dnsServers": [], "appliedDnsServers": [],
                             "internalDomainNameSuffix": internal_domain_name_suffix(nic)},
             "enableIPForwarding": False, "hostedWorkloads": [], "tapConfigurations": []}
    props |= {k: v for k, v in nic.properties.items() if k != "ipConfigurations"}
    props |= {"provisioningState": nic.provisioning_state, "resourceGuid": nic.resource_guid,
              "ipConfigurations": ip_configs, "macAddress": nic.mac_address,
              "primary": props.get("primary", True), "nicType": "Standard"}
    if nic.virtual_machine_id:
        props["virtualMachine"] = {"id": nic.virtual_machine_id}
    doc = {"id": nic.id, "name": nic.name, "etag": nic_etag(nic), "location": nic.location,
           "tags": nic.tags, "properties": props}
    if nic.scale_set_id is None:
        doc["type"] = "Microsoft.Network/networkInterfaces"
    return doc


def internal_domain_name_suffix(nic: Nic) -> str:
    """The NIC's `dnsSettings.internalDomainNameSuffix`: Azure's is one per virtual network
    (`<26 characters>.<2 letters>.internal.cloudapp.net`), so this one is derived from the VNet of
    the NIC's first subnet (else its resource group)."""
    configs = nic.properties.get("ipConfigurations") or [{}]
    subnet = ((configs[0].get("properties") or {}).get("subnet") or {}).get("id") or ""
    vnet = subnet.lower().split("/subnets/")[0] or nic.id.lower().split("/providers/")[0]
    digest = int.from_bytes(hashlib.sha256(vnet.encode()).digest(), "big")
    label = ""
    for _ in range(26):
        digest, digit = divmod(digest, 36)
        label += "0123456789abcdefghijklmnopqrstuvwxyz"[digit]
    return f"{label}.lc.internal.cloudapp.net"


def compute_etag(generation: int) -> str:
    """A Compute resource's etag: its write count, quoted ("1", "2", ...)."""
    return f'"{generation}"'


def nic_etag(nic: Nic) -> str:
    """A NIC's weak etag (Network's shape: W/"<guid>"), new after every write."""
    return f'W/"{nic.etag}"'


def operation_doc(op: Operation, provider: str) -> dict[str, Any]:
    """An Azure-AsyncOperation status: Compute's names the operation and its times, Network's is
    the status (and error) alone."""
    doc: dict[str, Any] = {"status": op.status}
    if provider.lower() == "microsoft.compute":
        doc = {"name": op.id, "startTime": op.start_time, **doc}
        if op.end_time:
            doc["endTime"] = op.end_time
    if op.error:
        doc["error"] = op.error
    return doc
