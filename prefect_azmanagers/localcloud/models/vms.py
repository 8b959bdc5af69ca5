"""Standalone VMs (detached VMs) and the VM-level views of Flexible scale sets' members."""

from __future__ import annotations

import uuid
from typing import Any

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.models.instances import Instances
from prefect_azmanagers.localcloud.models.nics import Nics
from prefect_azmanagers.localcloud.models.quotas import check_max_price
from prefect_azmanagers.localcloud.models.resources import (Instance, Operation, creation_order, public_keys,
                                                            system_identity, utcnow_iso)


class Vms(Instances, Nics):
    def vm(self, rg: str, name: str) -> Instance:
        inst = self.instances.get(self._compute_id(rg, "virtualMachines", name).lower())
        if inst is None:
            raise errors.resource_not_found("Microsoft.Compute/virtualMachines", name, rg)
        return inst

    def vms(self, rg: str, scale_set_id: str | None = None) -> list[Instance]:
        """Standalone and Flexible VMs of a resource group (optionally of one scale set)."""
        found = [
            i for i in self.instances.values()
            if i.instance_id is None and i.resource_group.lower() == rg.lower()
            and (scale_set_id is None or (i.scale_set_id or "").lower() == scale_set_id.lower())
        ]
        return sorted(found, key=creation_order)

    def put_vm(self, rg: str, name: str, body: dict[str, Any]) -> tuple[Instance, Operation, bool]:
        vm_arm_id = self._compute_id(rg, "virtualMachines", name)
        existing = self.instances.get(vm_arm_id.lower())
        props = dict(body["properties"])
        if existing is not None:
            # Updates of a running VM: tags only (the rest of the model needs a redeploy).
            existing.tags = dict(body.get("tags") or existing.tags)
            existing.generation += 1
            self._save(existing)
            return existing, self._done("VirtualMachines_CreateOrUpdate"), False
        spot = props.get("priority") == "Spot"
        sku = self._checked_sku(props["hardwareProfile"]["vmSize"], spot)
        check_max_price(props)
        nic_refs = props["networkProfile"]["networkInterfaces"]
        nics = [self._nic_by_id(ref["id"], vm_arm_id) for ref in nic_refs]
        self._check_quota(sku, 0 if spot else 1, 1 if spot else 0)
        os_profile = dict(props["osProfile"])
        custom_data = os_profile.pop("customData", None)
        props["osProfile"] = os_profile
        inst = Instance(
            name=name, id=vm_arm_id, resource_group=rg, location=body["location"], vm_id=str(uuid.uuid4()),
            computer_name=os_profile["computerName"], admin_username=os_profile["adminUsername"],
            public_keys=public_keys(os_profile), custom_data=custom_data, size=sku.name,
            priority="Spot" if spot else "Regular", eviction_policy=props.get("evictionPolicy") if spot else None,
            max_price=(props.get("billingProfile") or {}).get("maxPrice") if spot else None,
            tags=dict(body.get("tags") or {}), properties=props, nic_ids=[n.id for n in nics],
            time_created=utcnow_iso(), identity=system_identity(body),
        )
        self.instances[inst.id.lower()] = inst
        primary = nics[0]
        old_key = primary.address_key
        primary.address_key = inst.vm_id
        primary.private_ip = self.sandboxes.allocate(inst.vm_id)
        for nic in nics:
            nic.virtual_machine_id = inst.id
            self._save(nic)
        self._save(inst)
        allocation_failure = self._take_allocation_failure()

        async def work(op: Operation) -> None:
            await self.sandboxes.delete(old_key)  # the NIC's address now belongs to the VM
            await self._boot_all([inst], allocation_failure)

        return inst, self._operation("VirtualMachines_CreateOrUpdate", work), True

    def delete_vm(self, rg: str, name: str) -> Operation:
        inst = self.vm(rg, name)
        inst.power_state = "deleting"
        inst.provisioning_state = "Deleting"

        async def work(op: Operation) -> None:
            await self._remove_instance(inst)
            self._lower_capacity(inst)

        return self._operation("VirtualMachines_Delete", work)
