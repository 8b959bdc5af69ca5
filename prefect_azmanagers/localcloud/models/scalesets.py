"""Scale sets: create, update (capacity, tags), grow and shrink, delete instances; their members
(Uniform instances with their own NICs, Flexible members as VMs with NICs in the group)."""

from __future__ import annotations

import asyncio
import math
import secrets
import uuid
from dataclasses import replace
from typing import Any

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.config import Sku
from prefect_azmanagers.localcloud.models.instances import Instances
from prefect_azmanagers.localcloud.models.quotas import check_max_price
from prefect_azmanagers.localcloud.models.resources import (Instance, Nic, Operation, ScaleSet, creation_order, network_prefix,
                                                            new_mac, public_keys, system_identity, utcnow_iso)


class ScaleSets(Instances):
    def scale_set(self, rg: str, name: str) -> ScaleSet:
        ss = self.scale_sets.get(self._compute_id(rg, "virtualMachineScaleSets", name).lower())
        if ss is None:
            raise errors.resource_not_found("Microsoft.Compute/virtualMachineScaleSets", name, rg)
        return ss

    def scale_set_members(self, ss: ScaleSet) -> list[Instance]:
        members = [i for i in self.instances.values() if i.scale_set_id and i.scale_set_id.lower() == ss.id.lower()]
        return sorted(members, key=creation_order)

    def scale_set_vm(self, rg: str, vmss: str, instance_id: str) -> Instance:
        ss = self.scale_set(rg, vmss)
        for inst in self.scale_set_members(ss):
            if instance_id in (inst.instance_id, inst.name):
                return inst
        raise errors.not_found("The entity was not found in this Azure location.")  # CRP's words for it

    def scale_set_nics(self, ss: ScaleSet) -> list[Nic]:
        return [self.nics[n.lower()] for inst in self.scale_set_members(ss) for n in inst.nic_ids
                if n.lower() in self.nics]

    # ----- create and update -------------------------------------------------------------
    def put_scale_set(self, rg: str, name: str, body: dict[str, Any]) -> tuple[ScaleSet, Operation, bool]:
        """Create or update a scale set; returns it, its operation and whether it was created."""
        props = dict(body.get("properties", {}))
        profile = dict(props.get("virtualMachineProfile", {}))
        os_profile = dict(profile.get("osProfile", {}))
        custom_data = os_profile.pop("customData", None)
        profile["osProfile"] = os_profile
        props["virtualMachineProfile"] = profile
        props["orchestrationMode"] = props.get("orchestrationMode") or "Uniform"
        spot = profile.get("priority") == "Spot"
        sku = self._checked_sku(body["sku"]["name"], spot)
        check_max_price(profile)
        ss_id = self._compute_id(rg, "virtualMachineScaleSets", name)
        existing = self.scale_sets.get(ss_id.lower())
        requested = body["sku"].get("capacity")
        capacity = int(requested) if requested is not None else (existing.sku["capacity"] if existing else 0)
        if existing is None:
            if len(self.scale_sets) + 1 > self.config.quotas.get("virtualMachineScaleSets", 10**9):
                raise errors.ArmError(409, "OperationNotAllowed",
                                      "The subscription has reached its limit of virtual machine scale sets.")
            ss = ScaleSet(
                name=name, resource_group=rg, location=body["location"],
                sku={"name": sku.name, "tier": body["sku"].get("tier", "Standard"), "capacity": capacity},
                properties=props, custom_data=custom_data, tags=dict(body.get("tags") or {}),
                unique_id=str(uuid.uuid4()), time_created=utcnow_iso(), id=ss_id, identity=system_identity(body),
            )
            self._check_quota(sku, *self._plan_members(ss, capacity, 0))
            self.scale_sets[ss_id.lower()] = ss
        else:
            ss = existing
            if ss.orchestration_mode != props["orchestrationMode"]:
                raise errors.invalid_parameter(
                    "The orchestrationMode of an existing scale set cannot be changed.",
                    "properties.orchestrationMode")
            planned = replace(ss, properties=props)
            self._check_quota(sku, *self._plan_members(planned, capacity, len(self._live_members(ss))))
            ss.sku.update({"name": sku.name, "capacity": capacity})
            ss.properties, ss.tags = props, dict(body.get("tags") or ss.tags)
            if custom_data is not None:
                ss.custom_data = custom_data
            ss.provisioning_state = "Updating"
            ss.generation += 1
        op = self._resize(ss, capacity, sku)
        return ss, op, existing is None

    def patch_scale_set(self, rg: str, name: str, body: dict[str, Any]) -> tuple[ScaleSet, Operation]:
        """PATCH: capacity and tags."""
        ss = self.scale_set(rg, name)
        requested = (body.get("sku") or {}).get("capacity")
        capacity = ss.sku["capacity"] if requested is None else int(requested)
        sku = self._checked_sku(ss.sku["name"], ss.vm_profile.get("priority") == "Spot")
        op = self._resize(ss, capacity, sku)
        if "tags" in body:
            ss.tags = dict(body["tags"] or {})
        ss.provisioning_state = "Updating"
        ss.generation += 1
        self._save(ss)
        return ss, op

    # ----- members -----------------------------------------------------------------------
    def _live_members(self, ss: ScaleSet) -> list[Instance]:
        return [i for i in self.scale_set_members(ss) if i.power_state != "deleting"]

    def _plan_members(self, ss: ScaleSet, capacity: int, existing: int) -> tuple[int, int]:
        """(regular, spot) counts of the instances to add to reach `capacity`."""
        add = max(0, capacity - existing)
        if ss.vm_profile.get("priority") != "Spot":
            return add, 0
        mix = ss.properties.get("priorityMixPolicy")
        if not mix:
            return 0, add
        members = self._live_members(ss)
        regular_now = sum(1 for i in members if not i.is_spot)
        regular_target = regular_count(capacity, mix)
        regular = min(add, max(0, regular_target - regular_now))
        return regular, add - regular

    def _resize(self, ss: ScaleSet, capacity: int, sku: Sku) -> Operation:
        live = self._live_members(ss)
        regular, spot = self._plan_members(ss, capacity, len(live))
        if regular + spot:
            self._check_quota(sku, regular, spot)
        ss.sku["capacity"] = capacity
        new = [self._new_member(ss, priority="Regular" if n < regular else "Spot", sku=sku)
               for n in range(regular + spot)]
        doomed = sorted(live, key=creation_order)[capacity:] if len(live) > capacity else []
        for inst in doomed:
            inst.power_state = "deleting"  # at once, so a following request does not count them
        allocation_failure = bool(new) and self._take_allocation_failure()
        self._save(ss)

        async def work(op: Operation) -> None:
            try:
                await asyncio.gather(*(self._remove_instance(i) for i in doomed))
                await self._boot_all(new, allocation_failure)
            finally:
                failed = any(i.provisioning_state == "Failed" for i in new)
                if ss.id.lower() in self.scale_sets:
                    ss.provisioning_state = "Failed" if failed else "Succeeded"
                    self._save(ss)

        return self._operation("VirtualMachineScaleSets_CreateOrUpdate", work)

    def _new_member(self, ss: ScaleSet, *, priority: str, sku: Sku) -> Instance:
        profile = ss.vm_profile
        os_profile = profile.get("osProfile", {})
        prefix = os_profile.get("computerNamePrefix", ss.name)
        if ss.orchestration_mode == "Uniform":
            instance_id = str(ss.next_instance_id)
            ss.next_instance_id += 1
            name = f"{ss.name}_{instance_id}"
            vm_arm_id = f"{ss.id}/virtualMachines/{instance_id}"
            computer_name = prefix + base36(int(instance_id)).rjust(6, "0")
        else:
            instance_id = None
            name = f"{ss.name}_{secrets.token_hex(4)}"
            vm_arm_id = self._compute_id(ss.resource_group, "virtualMachines", name)
            computer_name = prefix + "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        vm_id = str(uuid.uuid4())
        properties = {
            "hardwareProfile": {"vmSize": sku.name},
            "storageProfile": profile.get("storageProfile", {}),
            "osProfile": {k: v for k, v in os_profile.items() if k != "computerNamePrefix"} | {"computerName": computer_name},
        }
        inst = Instance(
            name=name, id=vm_arm_id, resource_group=ss.resource_group, location=ss.location, vm_id=vm_id,
            computer_name=computer_name, admin_username=os_profile.get("adminUsername", ""),
            public_keys=public_keys(os_profile), custom_data=ss.custom_data, size=sku.name,
            priority=priority, eviction_policy=profile.get("evictionPolicy") if priority == "Spot" else None,
            max_price=(profile.get("billingProfile") or {}).get("maxPrice") if priority == "Spot" else None,
            tags=dict(ss.tags), properties=properties, nic_ids=[], time_created=utcnow_iso(),
            scale_set_id=ss.id, instance_id=instance_id, identity=ss.identity,
        )
        for config in profile.get("networkProfile", {}).get("networkInterfaceConfigurations", []):
            nic = self._member_nic(ss, inst, config)
            inst.nic_ids.append(nic.id)
        self.instances[inst.id.lower()] = inst
        self._save(inst)
        return inst

    def _member_nic(self, ss: ScaleSet, inst: Instance, config: dict[str, Any]) -> Nic:
        if inst.instance_id is not None:
            nic_id, nic_name, owner = f"{inst.id}/networkInterfaces/{config['name']}", config["name"], ss.id
        else:
            nic_name = f"{inst.name}-{config['name']}"
            nic_id, owner = f"{network_prefix(self.config.subscription_id, inst.resource_group)}/networkInterfaces/{nic_name}", None
        primary = not inst.nic_ids
        ip_configs = [
            {"name": ipc.get("name", "ipconfig1"),
             "properties": {"subnet": (ipc.get("properties") or {}).get("subnet"),
                            "privateIPAllocationMethod": "Dynamic", "primary": True}}
            for ipc in (config.get("properties") or {}).get("ipConfigurations", [])
        ]
        key = inst.vm_id if primary else f"{inst.vm_id}:{config['name']}"
        nic = Nic(
            name=nic_name, id=nic_id, resource_group=inst.resource_group, location=inst.location,
            properties={"primary": primary, "ipConfigurations": ip_configs,
                        "enableAcceleratedNetworking": (config.get("properties") or {}).get("enableAcceleratedNetworking", False)},
            tags={}, resource_guid=str(uuid.uuid4()), mac_address=new_mac(), private_ip=self.sandboxes.allocate(key),
            address_key=key, virtual_machine_id=inst.id, scale_set_id=owner,
        )
        self.nics[nic.id.lower()] = nic
        self._save(nic)
        return nic

    # ----- delete ------------------------------------------------------------------------
    def delete_scale_set(self, rg: str, name: str) -> Operation:
        ss = self.scale_set(rg, name)
        ss.provisioning_state = "Deleting"
        members = self._live_members(ss)
        for inst in members:
            inst.power_state = "deleting"

        async def work(op: Operation) -> None:
            await asyncio.gather(*(self._remove_instance(i) for i in members))
            self._forget(ss)

        return self._operation("VirtualMachineScaleSets_Delete", work)

    def delete_scale_set_instances(self, rg: str, name: str, instance_ids: list[str]) -> Operation:
        ss = self.scale_set(rg, name)
        members = [self.scale_set_vm(rg, name, iid) for iid in instance_ids]
        return self._delete_members(ss, members, "VirtualMachineScaleSets_DeleteInstances")

    def delete_scale_set_vm(self, rg: str, name: str, instance_id: str) -> Operation:
        ss = self.scale_set(rg, name)
        return self._delete_members(ss, [self.scale_set_vm(rg, name, instance_id)], "VirtualMachineScaleSetVMs_Delete")

    def _delete_members(self, ss: ScaleSet, members: list[Instance], op_name: str) -> Operation:
        fresh = [i for i in members if i.power_state != "deleting"]
        for inst in fresh:
            inst.power_state = "deleting"
        ss.sku["capacity"] = max(0, ss.sku["capacity"] - len(fresh))
        self._save(ss)

        async def work(op: Operation) -> None:
            await asyncio.gather(*(self._remove_instance(i) for i in fresh))

        return self._operation(op_name, work)


def regular_count(capacity: int, mix: dict[str, Any]) -> int:
    """Regular-priority instances a priorityMixPolicy asks for at `capacity`."""
    base = int(mix.get("baseRegularPriorityCount") or 0)
    pct = int(mix.get("regularPriorityPercentageAboveBase") or 0)
    if capacity <= base:
        return capacity
    return base + math.ceil((capacity - base) * pct / 100)


def base36(n: int) -> str:
    """n in base 36 (a Uniform instance's computer name suffix, as CRP names them)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out
