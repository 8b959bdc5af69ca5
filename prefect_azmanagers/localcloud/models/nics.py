"""Network interfaces: standalone NICs (detached VMs) and the lookups VMs make of them."""

from __future__ import annotations

import uuid
from typing import Any

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.models.operations import Operations
from prefect_azmanagers.localcloud.models.resources import Nic, Operation, network_prefix, new_mac


class Nics(Operations):
    def _nic_id(self, rg: str, name: str) -> str:
        return f"{network_prefix(self.config.subscription_id, rg)}/networkInterfaces/{name}"

    def nic(self, rg: str, name: str) -> Nic:
        nic = self.nics.get(self._nic_id(rg, name).lower())
        if nic is None:
            raise errors.resource_not_found("Microsoft.Network/networkInterfaces", name, rg)
        return nic

    def nics_in_group(self, rg: str) -> list[Nic]:
        """NICs listed by networkInterfaces.list: standalone and Flexible members' NICs."""
        return [n for n in self.nics.values() if n.scale_set_id is None and n.resource_group.lower() == rg.lower()]

    def put_nic(self, rg: str, name: str, body: dict[str, Any]) -> tuple[Nic, Operation, bool]:
        nic_id = self._nic_id(rg, name)
        existing = self.nics.get(nic_id.lower())
        if existing is not None:
            existing.tags = dict(body.get("tags") or existing.tags)
            existing.etag = str(uuid.uuid4())
            self._save(existing)
            nic, created = existing, False
        else:
            guid = str(uuid.uuid4())
            nic = Nic(
                name=name, id=nic_id, resource_group=rg, location=body["location"],
                properties=dict(body["properties"]), tags=dict(body.get("tags") or {}), resource_guid=guid,
                mac_address=new_mac(), private_ip=self.sandboxes.allocate(guid), address_key=guid,
            )
            self.nics[nic.id.lower()] = nic
            self._save(nic)
            created = True
        return nic, self._done("NetworkInterfaces_CreateOrUpdate"), created

    def delete_nic(self, rg: str, name: str) -> Operation:
        nic = self.nic(rg, name)
        if nic.virtual_machine_id:
            raise errors.ArmError(
                400, "NicInUse",
                f"Network Interface {nic.id} is used by existing resource {nic.virtual_machine_id}. In order to "
                "delete the network interface, it must be dissociated from the resource. To learn more, see "
                "aka.ms/deletenic.",
            )
        self._forget(nic)

        async def work(op: Operation) -> None:
            await self.sandboxes.delete(nic.address_key)

        return self._operation("NetworkInterfaces_Delete", work)

    def _nic_by_id(self, nic_id: str, vm_arm_id: str) -> Nic:
        """The NIC a VM body references; 400 as ARM answers when it is missing or in use."""
        nic = self.nics.get(nic_id.lower())
        if nic is None:
            raise errors.ArmError(
                400, "InvalidResourceReference",
                f"Resource {nic_id} referenced by resource {vm_arm_id} was not found. Please make sure that "
                "the referenced resource exists, and that both resources are in the same region.",
                details=[],
            )
        if nic.virtual_machine_id and nic.virtual_machine_id.lower() != vm_arm_id.lower():
            raise errors.ArmError(
                400, "NicInUse",
                f"Network Interface {nic.id} is used by existing resource {nic.virtual_machine_id}. In order to "
                "use it with another resource, it must be dissociated from the resource.",
            )
        return nic
