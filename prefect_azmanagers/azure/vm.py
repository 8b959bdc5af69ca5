"""Standalone VM + NIC (detached VMs): create, read, list, delete, and the name generator.

`create_vm` makes the NIC `<name>-nic` (from the NIC template, or a copy of the NIC the VM
template references), then the VM with deleteOption Delete on its OS disk, data disks and NIC,
waits for both, and returns the private IP. If anything fails or is interrupted after a
resource was requested, it deletes what it made before re-raising: nothing leaks.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from prefect_azmanagers.azure.clients import collect, delete_and_wait
from prefect_azmanagers.azure.errors import arm_errors
from prefect_azmanagers.azure.quota import ensure_quota
from prefect_azmanagers.azure.scaleset import apply_image_override, power_state
from prefect_azmanagers.exceptions import ConfigurationError, ResourceMissing, TemplateError

logger = logging.getLogger("prefect_azmanagers.azure")


@dataclass(frozen=True)
class VMInfo:
    name: str
    vm_id: str
    private_ip: str
    nic_name: str
    resource_group: str
    tags: dict = field(default_factory=dict)


def vm_name(basename: str = "azm") -> str:
    """A fresh VM name, `basename-xxxxxx` with six random lower-case letters (as AzManagers)."""
    return f"{basename}-" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(6))


def _resource_name(resource_id: str) -> str:
    return resource_id.rstrip("/").rsplit("/", 1)[-1]


def _primary_ip(nic: dict) -> str:
    for config in (nic.get("properties") or {}).get("ipConfigurations") or []:
        ip = (config.get("properties") or {}).get("privateIPAddress")
        if ip:
            return ip
    return ""


async def _nic_body_from_reference(clients: Any, vm_value: dict, location: str) -> dict:
    """A NIC body copying the subnet and settings of the NIC the VM template references."""
    refs = ((vm_value.get("properties") or {}).get("networkProfile") or {}).get("networkInterfaces") or []
    ref_id = (refs[0] or {}).get("id") if refs else None
    if not ref_id or "/resourceGroups/" not in ref_id:
        raise ConfigurationError(
            "No NIC template given and the VM template references no NIC to copy. Pass a NIC "
            "template (prefect-azmanagers template build-nic ...).")
    group = ref_id.split("/resourceGroups/", 1)[1].split("/", 1)[0]
    try:
        with arm_errors(f"read NIC {_resource_name(ref_id)} referenced by the VM template"):
            nic = (await clients.network.network_interfaces.get(group, _resource_name(ref_id))).as_dict()
    except ResourceMissing:
        raise ConfigurationError(
            f"No NIC template given and the NIC the VM template references ({ref_id}) does not "
            "exist. Pass a NIC template (prefect-azmanagers template build-nic ...).") from None
    props = nic.get("properties") or {}
    configs = [{"name": c.get("name") or "ipconfig1",
                "properties": {"subnet": {"id": ((c.get("properties") or {}).get("subnet") or {}).get("id")},
                               "privateIPAllocationMethod": "Dynamic"}}
               for c in props.get("ipConfigurations") or []]
    body: dict = {"location": nic.get("location") or location, "properties": {"ipConfigurations": configs}}
    if "enableAcceleratedNetworking" in props:
        body["properties"]["enableAcceleratedNetworking"] = props["enableAcceleratedNetworking"]
    return body


def _vm_body(manifest: Any, vm_value: dict, name: str, nic_id: str, custom_data: str,
             tags: dict[str, str], os_disk_size: int | None, image_name: str | None,
             image_version: str | None, spot: bool = False, max_price: float = -1) -> dict:
    body = copy.deepcopy(vm_value)
    try:
        props = body["properties"]
        os_profile = props["osProfile"]
    except (KeyError, TypeError):
        raise TemplateError("The VM template's value lacks properties.osProfile; rebuild it with build_vmtemplate.") from None
    admin = manifest.ssh_user or os_profile.get("adminUsername")
    os_profile["adminUsername"] = admin
    os_profile["computerName"] = name
    os_profile["customData"] = custom_data
    keys = os_profile.setdefault("linuxConfiguration", {}).setdefault("ssh", {}).setdefault("publicKeys", [])
    key_data = manifest.read_public_key().strip()
    if not any(k.get("keyData", "").strip() == key_data for k in keys):
        keys.append({"path": f"/home/{admin}/.ssh/authorized_keys", "keyData": key_data})
    storage = props.setdefault("storageProfile", {})
    os_disk = storage.setdefault("osDisk", {})
    os_disk["deleteOption"] = "Delete"
    if os_disk_size:
        os_disk["diskSizeGB"] = os_disk_size
    for disk in storage.get("dataDisks") or []:
        disk["deleteOption"] = "Delete"
        if disk.get("name"):
            disk["name"] = f"{name}-{disk['name']}"
    apply_image_override(storage, image_name, image_version)
    props["networkProfile"] = {"networkInterfaces": [
        {"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}}]}
    body["tags"] = {**(body.get("tags") or {}), **tags}
    if spot:   # a Spot VM is deleted (with its disks and NIC) when Azure evicts it
        props["priority"] = "Spot"
        props["evictionPolicy"] = "Delete"
        props["billingProfile"] = {"maxPrice": max_price}
    return body


async def create_vm(clients: Any, manifest: Any, vm_template: Any, nic_template: Any | None,
                    name: str, *, custom_data: str, tags: dict[str, str],
                    os_disk_size: int | None = None, image_name: str | None = None,
                    image_version: str | None = None, quota_wait: float = 0.0,
                    spot: bool = False, max_price: float = -1) -> VMInfo:
    """Create NIC + VM and wait until both are provisioned; returns the VM (with its private IP).

    `spot=True` makes a Spot VM (eviction policy Delete) paying at most `max_price` per hour
    (-1: up to the on-demand price), counted against the low-priority quota.

    On any failure or interruption, deletes the VM and NIC it requested, then re-raises.
    """
    value = vm_template.value
    rg = vm_template.resource_group or manifest.resource_group
    location = value.get("location") or getattr(manifest, "location", None)
    size = ((value.get("properties") or {}).get("hardwareProfile") or {}).get("vmSize")
    if not (rg and location and size):
        raise TemplateError(
            f"The VM template needs a resource group, a location and hardwareProfile.vmSize "
            f"(got {rg!r}, {location!r}, {size!r}).")
    await ensure_quota(clients, location, size, regular=0 if spot else 1, spot=1 if spot else 0,
                       wait=quota_wait)
    if nic_template is not None:
        nic_body = copy.deepcopy(nic_template.value)
        nic_body.setdefault("location", location)
    else:
        nic_body = await _nic_body_from_reference(clients, value, location)
    nic_body["tags"] = {**(nic_body.get("tags") or {}), **tags}
    nic_name = f"{name}-nic"
    nic_id = (f"/subscriptions/{clients.subscription_id}/resourceGroups/{rg}"
              f"/providers/Microsoft.Network/networkInterfaces/{nic_name}")
    # Built before anything is created, so a template error leaves nothing behind.
    body = _vm_body(manifest, value, name, nic_id, custom_data, tags, os_disk_size, image_name,
                    image_version, spot, max_price)
    made_vm = False
    try:
        with arm_errors(f"create NIC {nic_name}"):
            poller = await clients.network.network_interfaces.begin_create_or_update(rg, nic_name, nic_body)
            await poller.result()
        made_vm = True
        with arm_errors(f"create VM {name}"):
            poller = await clients.compute.virtual_machines.begin_create_or_update(rg, name, body)
            vm = (await poller.result()).as_dict()
        with arm_errors(f"read NIC {nic_name}"):   # the address as attached to the VM
            ip = _primary_ip((await clients.network.network_interfaces.get(rg, nic_name)).as_dict())
    except BaseException:
        logger.warning("Creating VM %s failed or was interrupted; deleting what was made", name)
        try:
            if made_vm:
                await delete_vm(clients, rg, name, nic_name=nic_name)
            else:
                await delete_nic(clients, rg, nic_name)
        except Exception as cleanup_exc:   # report, but keep the original error
            logger.error("Could not delete VM %s / NIC %s after a failure: %s. Run "
                         "`prefect-azmanagers cleanup`.", name, nic_name, cleanup_exc)
        raise
    return VMInfo(name=name, vm_id=(vm.get("properties") or {}).get("vmId", ""), private_ip=ip,
                  nic_name=nic_name, resource_group=rg, tags=dict(vm.get("tags") or {}))


async def get_vm(clients: Any, resource_group: str, name: str) -> VMInfo:
    """The VM's info incl. private IP; ResourceMissing if it does not exist."""
    with arm_errors(f"read VM {name}"):
        vm = (await clients.compute.virtual_machines.get(resource_group, name)).as_dict()
    refs = ((vm.get("properties") or {}).get("networkProfile") or {}).get("networkInterfaces") or []
    nic_name, ip = "", ""
    if refs and refs[0].get("id"):
        nic_name = _resource_name(refs[0]["id"])
        try:
            with arm_errors(f"read NIC {nic_name} of VM {name}"):
                ip = _primary_ip((await clients.network.network_interfaces.get(resource_group, nic_name)).as_dict())
        except ResourceMissing:
            ip = ""
    return VMInfo(name=vm["name"], vm_id=(vm.get("properties") or {}).get("vmId", ""), private_ip=ip,
                  nic_name=nic_name, resource_group=resource_group, tags=dict(vm.get("tags") or {}))


async def vm_power_state(clients: Any, resource_group: str, name: str) -> str | None:
    """The VM's power state ("running", "stopped", "deallocated", ...); ResourceMissing if it
    does not exist."""
    with arm_errors(f"read the instance view of VM {name}"):
        view = await clients.compute.virtual_machines.instance_view(resource_group, name)
    return power_state(view.as_dict())


async def list_vms(clients: Any, resource_group: str, *, tag_filter: dict[str, str] | None = None) -> list[VMInfo]:
    """Standalone VMs of the group (not scale-set members) whose tags include `tag_filter`.

    Two paged lists (VMs, NICs) whatever the number of VMs.
    """
    wanted = tag_filter or {}
    with arm_errors(f"list the VMs of resource group {resource_group}"):
        vms, nics = await asyncio.gather(collect(clients.compute.virtual_machines.list(resource_group)),
                                         collect(clients.network.network_interfaces.list(resource_group)))
    nic_by_id = {(n.get("id") or "").lower(): n for n in nics}
    found = []
    for vm in vms:
        props = vm.get("properties") or {}
        tags = vm.get("tags") or {}
        if props.get("virtualMachineScaleSet") or any(tags.get(k) != v for k, v in wanted.items()):
            continue
        refs = (props.get("networkProfile") or {}).get("networkInterfaces") or []
        nic_id = (refs[0].get("id") or "") if refs else ""
        found.append(VMInfo(name=vm["name"], vm_id=props.get("vmId", ""),
                            private_ip=_primary_ip(nic_by_id.get(nic_id.lower(), {})),
                            nic_name=_resource_name(nic_id) if nic_id else "",
                            resource_group=resource_group, tags=dict(tags)))
    return found


async def delete_nic(clients: Any, resource_group: str, name: str) -> None:
    """Delete a NIC and wait (already gone is fine)."""
    await delete_and_wait(f"delete NIC {name}",
                          clients.network.network_interfaces.begin_delete(resource_group, name))


async def delete_vm(clients: Any, resource_group: str, name: str, *, nic_name: str | None = None) -> None:
    """Delete the VM (its disks and NIC go with it: deleteOption Delete), then its NIC if it
    is still there (VMs made elsewhere, or a VM whose creation failed). Waits; idempotent."""
    if nic_name is None:
        try:
            nic_name = (await get_vm(clients, resource_group, name)).nic_name or f"{name}-nic"
        except ResourceMissing:
            nic_name = f"{name}-nic"
    await delete_and_wait(f"delete VM {name}",
                          clients.compute.virtual_machines.begin_delete(resource_group, name))
    await delete_nic(clients, resource_group, nic_name)
