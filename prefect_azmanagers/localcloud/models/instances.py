"""What every VM goes through, whoever made it: boot into a sandbox, removal, guest faults, IMDS.

An instance is "Creating" until the sandbox's `boot()` returned (its sshd accepts connections),
then "Succeeded"/running; a failed boot makes it "Failed" and fails the operation that created it.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.models.operations import Operations
from prefect_azmanagers.localcloud.models.quotas import Quotas
from prefect_azmanagers.localcloud.models.resources import Instance
from prefect_azmanagers.localcloud.sandbox import InstanceSpec


class Instances(Operations, Quotas):
    def find_instance(self, ref: str) -> Instance:
        """An instance by VM name, vmId, computer name or ARM id (admin API)."""
        for inst in self.instances.values():
            if ref.lower() in (inst.name.lower(), inst.vm_id, inst.computer_name.lower(), inst.id.lower()):
                return inst
        raise KeyError(f"no instance named {ref!r}; known: {sorted(i.name for i in self.instances.values())}")

    def instance_by_vm_id(self, vm_id: str) -> Instance | None:
        return next((i for i in self.instances.values() if i.vm_id == vm_id), None)

    def live_instances(self) -> int:
        return sum(1 for i in self.instances.values() if i.power_state == "running")

    # ----- boot --------------------------------------------------------------------------
    async def _boot_all(self, new: list[Instance], allocation_failure: bool) -> None:
        if allocation_failure:
            for inst in new:
                inst.provisioning_state, inst.power_state = "Failed", "stopped"
                inst.error = errors.allocation_failed().body()["error"]
                self._save(inst)
            raise errors.allocation_failed()
        results = await asyncio.gather(*(self._boot(i) for i in new), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _boot(self, inst: Instance) -> None:
        if self.faults.boot_failures:
            self.faults.boot_failures -= 1
            self._boot_failed(inst, "boot failure injected by the local cloud's admin API")
        spec = InstanceSpec(
            key=inst.vm_id, name=inst.name, computer_name=inst.computer_name,
            admin_username=inst.admin_username, public_keys=inst.public_keys,
            custom_data=inst.custom_data, metadata=self.imds_compute(inst),
            boot_delay=self.config.boot_delay,
        )
        try:
            await self.sandboxes.boot(spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if inst.power_state == "deleting":
                return  # deleted while booting (e.g. a scale-in): not a failure of the operation
            self._boot_failed(inst, str(exc) or type(exc).__name__)
        if inst.power_state == "starting":
            inst.provisioning_state, inst.power_state = "Succeeded", "running"
            self._save(inst)

    def _boot_failed(self, inst: Instance, reason: str) -> None:
        exc = errors.os_provisioning_failed(inst.name, reason)
        inst.provisioning_state, inst.power_state, inst.error = "Failed", "stopped", exc.body()["error"]
        self._save(inst)
        raise exc

    # ----- removal -----------------------------------------------------------------------
    async def _remove_instance(self, inst: Instance) -> None:
        """Delete an instance: its sandbox, its NICs (scale set members) and its record."""
        inst.power_state = "deleting"
        self._evictions.pop(inst.vm_id, None)
        await self.sandboxes.delete(inst.vm_id)
        for nic_id in inst.nic_ids:
            nic = self.nics.get(nic_id.lower())
            if nic is None:
                continue
            if inst.scale_set_id is not None or _delete_option(inst, nic_id) == "Delete":
                await self.sandboxes.delete(nic.address_key)
                self._forget(nic)
            else:
                nic.virtual_machine_id = None
                nic.address_key = nic.resource_guid
                nic.private_ip = self.sandboxes.allocate(nic.address_key)
                self._save(nic)
        self._forget(inst)

    def _lower_capacity(self, inst: Instance) -> None:
        """A Flexible member removed on its own (VM delete, eviction): its scale set shrinks by one."""
        ss = self.scale_sets.get(inst.scale_set_id.lower()) if inst.scale_set_id else None
        if ss is not None:
            ss.sku["capacity"] = max(0, ss.sku["capacity"] - 1)
            self._save(ss)

    # ----- guest faults (admin API) ------------------------------------------------------
    async def kill(self, inst: Instance) -> None:
        """Abrupt death of the guest: processes gone, ARM keeps the VM, powered off ("stopped")."""
        await self.sandboxes.kill(inst.vm_id)
        inst.power_state = "stopped"
        self._save(inst)

    async def drop_ssh(self, inst: Instance) -> None:
        await self.sandboxes.drop_ssh(inst.vm_id)

    # ----- IMDS --------------------------------------------------------------------------
    def imds_compute(self, inst: Instance) -> dict[str, Any]:
        """The IMDS `compute` document of an instance (Azure's field names)."""
        image = inst.properties.get("storageProfile", {}).get("imageReference", {}) or {}
        ss_name = inst.scale_set_id.rsplit("/", 1)[-1] if inst.scale_set_id else ""
        return {
            "azEnvironment": "AzurePublicCloud",
            "location": inst.location,
            "name": inst.name,
            "computerName": inst.computer_name,
            "osType": "Linux",
            "offer": image.get("offer", ""),
            "publisher": image.get("publisher", ""),
            "sku": image.get("sku", ""),
            "version": image.get("version", ""),
            "priority": inst.priority,
            "provider": "Microsoft.Compute",
            "resourceGroupName": inst.resource_group,
            "resourceId": inst.id,
            "subscriptionId": self.config.subscription_id,
            "tags": ";".join(f"{k}:{v}" for k, v in inst.tags.items()),
            "tagsList": [{"name": k, "value": v} for k, v in inst.tags.items()],
            "vmId": inst.vm_id,
            "vmScaleSetName": ss_name,
            "vmSize": inst.size,
            "zone": "",
            "osProfile": {"adminUsername": inst.admin_username, "computerName": inst.computer_name},
        }


def _delete_option(inst: Instance, nic_id: str) -> str:
    for ref in inst.properties.get("networkProfile", {}).get("networkInterfaces", []):
        if ref.get("id", "").lower() == nic_id.lower():
            return (ref.get("properties") or {}).get("deleteOption", "Detach")
    return "Detach"


def check_custom_data(value: str, path: str) -> None:
    """Refuse customData that is not base64 (ARM: InvalidParameter)."""
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        raise errors.invalid_parameter(
            "Custom data in OSProfile must be in Base64 encoding and with a maximum length of 87380 "
            "characters.", path) from None
    if len(value) > 87380:
        raise errors.invalid_parameter(
            "Custom data in OSProfile must be in Base64 encoding and with a maximum length of 87380 "
            f"characters (got {len(value)}).", path)
