"""The local cloud's resources and their state machines, without HTTP (moto's models.py).

`Backend` owns scale sets, VMs (a Uniform scale set's instances, Flexible members and standalone
VMs), NICs and long-running operations. Every instance is a sandbox of the injected
`SandboxHost` (sandbox.py), keyed by the instance's vmId: an instance is "Creating" until
`boot()` returned (its sshd accepts connections), then "Succeeded"/running; a failed boot makes
it "Failed" and fails the operation that created it. Quotas, SKUs and injected faults are
checked here, so the HTTP layer (responses.py) only parses, validates shapes and serializes.

Records persist in the Store; after a restart the sandboxes are gone, so instances come back
deallocated (their ARM resources stay, which is what a user's cleanup after a crash needs).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import secrets
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any, Awaitable, Callable, Protocol

from prefect_azmanagers.localcloud import exceptions as errors
from prefect_azmanagers.localcloud.config import LocalCloudConfig, Sku
from prefect_azmanagers.localcloud.sandbox import InstanceSpec
from prefect_azmanagers.localcloud.store import Store

logger = logging.getLogger("prefect_azmanagers.localcloud")

TERMINAL = {"Succeeded", "Failed", "Canceled"}


def utcnow_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class InstanceSandboxes(Protocol):
    """What the backend needs from SandboxHost (see docs/architecture.md, "Local cloud")."""

    def allocate(self, key: str) -> str: ...
    async def boot(self, spec: InstanceSpec) -> None: ...
    def post_scheduled_event(self, key: str, event: dict) -> None: ...
    def clear_scheduled_events(self, key: str) -> None: ...
    async def kill(self, key: str) -> None: ...
    async def drop_ssh(self, key: str) -> None: ...
    async def delete(self, key: str) -> None: ...
    def describe(self, key: str) -> dict: ...


def compute_prefix(subscription: str, resource_group: str) -> str:
    return f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Compute"


def network_prefix(subscription: str, resource_group: str) -> str:
    return f"/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Network"


@dataclass
class ScaleSet:
    name: str
    resource_group: str
    location: str
    sku: dict[str, Any]                 # name, tier, capacity (the target)
    properties: dict[str, Any]          # as sent, customData removed
    custom_data: str | None
    tags: dict[str, str]
    unique_id: str
    time_created: str
    id: str
    provisioning_state: str = "Creating"
    next_instance_id: int = 0

    @property
    def orchestration_mode(self) -> str:
        return self.properties.get("orchestrationMode", "Uniform")

    @property
    def vm_profile(self) -> dict[str, Any]:
        return self.properties.get("virtualMachineProfile", {})


@dataclass
class Instance:
    """A VM: a Uniform scale set's instance (instance_id set) or a Flexible/standalone VM."""

    name: str
    id: str
    resource_group: str
    location: str
    vm_id: str
    computer_name: str
    admin_username: str
    public_keys: list[str]
    custom_data: str | None
    size: str
    priority: str                       # "Regular" | "Spot"
    eviction_policy: str | None
    max_price: float | None
    tags: dict[str, str]
    properties: dict[str, Any]          # VM properties as sent/derived, customData removed
    nic_ids: list[str]
    time_created: str
    scale_set_id: str | None = None
    instance_id: str | None = None      # Uniform only
    provisioning_state: str = "Creating"
    power_state: str = "starting"       # starting | running | stopped | deallocated | deleting
    error: dict[str, Any] | None = None

    @property
    def is_spot(self) -> bool:
        return self.priority == "Spot"


@dataclass
class Nic:
    name: str
    id: str
    resource_group: str
    location: str
    properties: dict[str, Any]
    tags: dict[str, str]
    resource_guid: str
    mac_address: str
    private_ip: str
    address_key: str                    # the sandbox allocation that holds private_ip
    virtual_machine_id: str | None = None
    scale_set_id: str | None = None     # set for a Uniform instance's NIC
    provisioning_state: str = "Succeeded"


@dataclass
class Operation:
    """An ARM long-running operation as its Azure-AsyncOperation URL reports it."""

    id: str
    name: str
    start_time: str = field(default_factory=utcnow_iso)
    status: str = "InProgress"
    end_time: str | None = None
    error: dict[str, Any] | None = None


@dataclass
class Faults:
    """Injected faults (admin API): each counter is consumed by the requests/LROs it hits."""

    throttle: int = 0
    throttle_retry_after: int = 1
    throttle_operation: str | None = None
    fail: int = 0
    fail_retry_after: int | None = None
    fail_operation: str | None = None
    allocation_failures: int = 0
    boot_failures: int = 0


class Backend:
    """All resources of one local cloud and what happens to them."""

    def __init__(
        self,
        config: LocalCloudConfig,
        store: Store,
        sandboxes: InstanceSandboxes,
    ):
        self.config = config
        self.store = store
        self.sandboxes = sandboxes
        self.scale_sets: dict[str, ScaleSet] = {}
        self.instances: dict[str, Instance] = {}
        self.nics: dict[str, Nic] = {}
        self.operations: dict[str, Operation] = {}
        self.faults = Faults()
        self.counters: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._evictions: dict[str, tuple[str, asyncio.Event]] = {}  # vmId -> (EventId, acked)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load()

    # ----- persistence -------------------------------------------------------------------
    def _load(self) -> None:
        for rec in self.store.load("scale_set"):
            ss = ScaleSet(**rec)
            if ss.provisioning_state not in TERMINAL:
                ss.provisioning_state = "Failed"
            self.scale_sets[ss.id.lower()] = ss
        for rec in self.store.load("instance"):
            inst = Instance(**rec)
            # The sandbox did not survive the restart: the VM is kept, deallocated.
            if inst.provisioning_state not in TERMINAL:
                inst.provisioning_state = "Failed"
            inst.power_state = "deallocated"
            self.instances[inst.id.lower()] = inst
        for rec in self.store.load("nic"):
            nic = Nic(**rec)
            # Azure keeps a NIC's dynamic private IP while it exists (also when its VM is deallocated).
            nic.private_ip = self.sandboxes.allocate(nic.address_key)
            self.nics[nic.id.lower()] = nic

    def _table(self, obj: ScaleSet | Instance | Nic) -> dict:
        return {ScaleSet: self.scale_sets, Instance: self.instances, Nic: self.nics}[type(obj)]

    def _save(self, obj: ScaleSet | Instance | Nic) -> None:
        if self._table(obj).get(obj.id.lower()) is not obj:
            return  # deleted meanwhile (e.g. a boot failing because its instance was deleted)
        kind = {ScaleSet: "scale_set", Instance: "instance", Nic: "nic"}[type(obj)]
        self.store.put(kind, obj.id, asdict(obj))

    def _forget(self, obj: ScaleSet | Instance | Nic) -> None:
        self._table(obj).pop(obj.id.lower(), None)
        self.store.delete(obj.id)

    # ----- lifecycle ---------------------------------------------------------------------
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the loop so thread-side callbacks (event acks) can reach it."""
        self._loop = loop

    async def shutdown(self) -> None:
        """Cancel every operation and eviction in flight (the sandboxes are stopped by the caller)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----- ids and lookups ---------------------------------------------------------------
    def _compute_id(self, rg: str, *parts: str) -> str:
        return "/".join([compute_prefix(self.config.subscription_id, rg), *parts])

    def scale_set(self, rg: str, name: str) -> ScaleSet:
        ss = self.scale_sets.get(self._compute_id(rg, "virtualMachineScaleSets", name).lower())
        if ss is None:
            raise errors.resource_not_found("Microsoft.Compute/virtualMachineScaleSets", name, rg)
        return ss

    def scale_set_members(self, ss: ScaleSet) -> list[Instance]:
        members = [i for i in self.instances.values() if i.scale_set_id and i.scale_set_id.lower() == ss.id.lower()]
        return sorted(members, key=_creation_order)

    def scale_set_vm(self, rg: str, vmss: str, instance_id: str) -> Instance:
        ss = self.scale_set(rg, vmss)
        for inst in self.scale_set_members(ss):
            if instance_id in (inst.instance_id, inst.name):
                return inst
        raise errors.not_found(
            f"The Resource 'Microsoft.Compute/virtualMachineScaleSets/{vmss}/virtualMachines/{instance_id}' "
            f"under resource group '{rg}' was not found."
        )

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
        return sorted(found, key=_creation_order)

    def nic(self, rg: str, name: str) -> Nic:
        nic_id = f"{network_prefix(self.config.subscription_id, rg)}/networkInterfaces/{name}"
        nic = self.nics.get(nic_id.lower())
        if nic is None:
            raise errors.resource_not_found("Microsoft.Network/networkInterfaces", name, rg)
        return nic

    def nics_in_group(self, rg: str) -> list[Nic]:
        """NICs listed by networkInterfaces.list: standalone and Flexible members' NICs."""
        return [n for n in self.nics.values() if n.scale_set_id is None and n.resource_group.lower() == rg.lower()]

    def scale_set_nics(self, ss: ScaleSet) -> list[Nic]:
        return [self.nics[n.lower()] for inst in self.scale_set_members(ss) for n in inst.nic_ids
                if n.lower() in self.nics]

    def find_instance(self, ref: str) -> Instance:
        """An instance by VM name, vmId, computer name or ARM id (admin API)."""
        for inst in self.instances.values():
            if ref.lower() in (inst.name.lower(), inst.vm_id, inst.computer_name.lower(), inst.id.lower()):
                return inst
        raise KeyError(f"no instance named {ref!r}; known: {sorted(i.name for i in self.instances.values())}")

    # ----- quotas ------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        """Current usage per quota name (deallocated VMs do not count, as on Azure)."""
        used = {name: 0 for name in self.config.quotas}
        for inst in self.instances.values():
            if inst.power_state == "deallocated":
                continue
            sku = self.config.sku(inst.size)
            vcpus = sku.vcpus if sku else 0
            used["virtualMachines"] = used.get("virtualMachines", 0) + 1
            if inst.is_spot:
                used["lowPriorityCores"] = used.get("lowPriorityCores", 0) + vcpus
            else:
                used["cores"] = used.get("cores", 0) + vcpus
                if sku:
                    used[sku.family] = used.get(sku.family, 0) + vcpus
        used["virtualMachineScaleSets"] = len(self.scale_sets)
        return used

    def _check_quota(self, sku: Sku, regular: int, spot: int) -> None:
        used = self.usage()
        location = self.config.location
        asks: list[tuple[str, str, int]] = []
        if regular:
            asks += [(sku.family, f"{sku.family} Cores", regular * sku.vcpus),
                     ("cores", "Total Regional Cores", regular * sku.vcpus)]
        if spot:
            asks.append(("lowPriorityCores", "LowPriorityCores", spot * sku.vcpus))
        if regular + spot:
            asks.append(("virtualMachines", "Total Regional Virtual Machines", regular + spot))
        for name, label, required in asks:
            limit = self.config.quotas.get(name)
            if limit is not None and used.get(name, 0) + required > limit:
                raise errors.quota_exceeded(label, location, limit, used.get(name, 0), required)

    def _checked_sku(self, name: str, spot: bool) -> Sku:
        sku = self.config.sku(name)
        if sku is None or sku.restricted:
            raise errors.sku_not_available(name, self.config.location)
        if spot and not sku.spot_capable:
            raise errors.ArmError(
                409, "AzureSpotIsNotSupportedForThisVMSize",
                f"Azure Spot is not supported for the VM size '{sku.name}'. Choose a size that supports Spot "
                "(see the LowPriorityCapable capability of the resource SKUs).",
            )
        return sku

    # ----- faults ------------------------------------------------------------------------
    def take_request_fault(self, operation: str) -> errors.ArmError | None:
        """Consume one injected throttle/failure that applies to this request, if any."""
        f = self.faults
        if f.throttle and f.throttle_operation in (None, operation):
            f.throttle -= 1
            return errors.throttled(f.throttle_retry_after, utcnow_iso())
        if f.fail and f.fail_operation in (None, operation):
            f.fail -= 1
            return errors.service_unavailable(f.fail_retry_after)
        return None

    def count(self, operation: str) -> None:
        self.counters[operation] = self.counters.get(operation, 0) + 1

    # ----- operations --------------------------------------------------------------------
    def _operation(self, name: str, work: Callable[[Operation], Awaitable[None]]) -> Operation:
        op = Operation(id=str(uuid.uuid4()), name=name)
        self.operations[op.id] = op
        self._prune_operations()

        async def run() -> None:
            try:
                await work(op)
                if op.status == "InProgress":
                    op.status = "Succeeded"
            except errors.ArmError as exc:
                op.status, op.error = "Failed", exc.body()["error"]
            except asyncio.CancelledError:
                op.status = "Canceled"
                raise
            except Exception as exc:  # an emulator bug must still end the LRO, and be logged
                logger.exception("operation %s failed", name)
                op.status = "Failed"
                op.error = {"code": "InternalExecutionError", "message": f"{type(exc).__name__}: {exc}"}
            finally:
                op.end_time = utcnow_iso()

        self._spawn(run())
        return op

    def _prune_operations(self) -> None:
        if len(self.operations) < 2000:
            return
        for op_id in [k for k, op in self.operations.items() if op.status in TERMINAL][:1000]:
            del self.operations[op_id]

    # ----- scale sets --------------------------------------------------------------------
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
        _check_max_price(profile)
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
                unique_id=str(uuid.uuid4()), time_created=utcnow_iso(), id=ss_id,
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
        self._save(ss)
        return ss, op

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
        regular_target = _regular_count(capacity, mix)
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
        doomed = sorted(live, key=_creation_order)[capacity:] if len(live) > capacity else []
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
            computer_name = prefix + _base36(int(instance_id)).rjust(6, "0")
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
            public_keys=_public_keys(os_profile), custom_data=ss.custom_data, size=sku.name,
            priority=priority, eviction_policy=profile.get("evictionPolicy") if priority == "Spot" else None,
            max_price=(profile.get("billingProfile") or {}).get("maxPrice") if priority == "Spot" else None,
            tags=dict(ss.tags), properties=properties, nic_ids=[], time_created=utcnow_iso(),
            scale_set_id=ss.id, instance_id=instance_id,
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
            tags={}, resource_guid=str(uuid.uuid4()), mac_address=_mac(), private_ip=self.sandboxes.allocate(key),
            address_key=key, virtual_machine_id=inst.id, scale_set_id=owner,
        )
        self.nics[nic.id.lower()] = nic
        self._save(nic)
        return nic

    def _take_allocation_failure(self) -> bool:
        if self.faults.allocation_failures:
            self.faults.allocation_failures -= 1
            return True
        return False

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

    async def _remove_instance(self, inst: Instance) -> None:
        """Delete an instance: its sandbox, its NICs (scale set members) and its record."""
        inst.power_state = "deleting"
        self._cancel_eviction(inst)
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

    # ----- standalone VMs ----------------------------------------------------------------
    def put_vm(self, rg: str, name: str, body: dict[str, Any]) -> tuple[Instance, Operation, bool]:
        vm_arm_id = self._compute_id(rg, "virtualMachines", name)
        existing = self.instances.get(vm_arm_id.lower())
        props = dict(body["properties"])
        if existing is not None:
            # Updates of a running VM: tags only (the rest of the model needs a redeploy).
            existing.tags = dict(body.get("tags") or existing.tags)
            self._save(existing)

            async def noop(op: Operation) -> None:
                return None

            return existing, self._operation("VirtualMachines_CreateOrUpdate", noop), False
        spot = props.get("priority") == "Spot"
        sku = self._checked_sku(props["hardwareProfile"]["vmSize"], spot)
        _check_max_price(props)
        nic_refs = props["networkProfile"]["networkInterfaces"]
        nics = [self._nic_by_id(ref["id"], vm_arm_id) for ref in nic_refs]
        self._check_quota(sku, 0 if spot else 1, 1 if spot else 0)
        os_profile = dict(props["osProfile"])
        custom_data = os_profile.pop("customData", None)
        props["osProfile"] = os_profile
        inst = Instance(
            name=name, id=vm_arm_id, resource_group=rg, location=body["location"], vm_id=str(uuid.uuid4()),
            computer_name=os_profile["computerName"], admin_username=os_profile["adminUsername"],
            public_keys=_public_keys(os_profile), custom_data=custom_data, size=sku.name,
            priority="Spot" if spot else "Regular", eviction_policy=props.get("evictionPolicy") if spot else None,
            max_price=(props.get("billingProfile") or {}).get("maxPrice") if spot else None,
            tags=dict(body.get("tags") or {}), properties=props, nic_ids=[n.id for n in nics],
            time_created=utcnow_iso(),
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

    def _nic_by_id(self, nic_id: str, vm_arm_id: str) -> Nic:
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

    def delete_vm(self, rg: str, name: str) -> Operation:
        inst = self.vm(rg, name)
        inst.power_state = "deleting"
        inst.provisioning_state = "Deleting"

        async def work(op: Operation) -> None:
            await self._remove_instance(inst)
            if inst.scale_set_id:
                ss = self.scale_sets.get(inst.scale_set_id.lower())
                if ss is not None:
                    ss.sku["capacity"] = max(0, ss.sku["capacity"] - 1)
                    self._save(ss)

        return self._operation("VirtualMachines_Delete", work)

    # ----- NICs --------------------------------------------------------------------------
    def put_nic(self, rg: str, name: str, body: dict[str, Any]) -> tuple[Nic, Operation, bool]:
        nic_id = f"{network_prefix(self.config.subscription_id, rg)}/networkInterfaces/{name}"
        existing = self.nics.get(nic_id.lower())
        if existing is not None:
            existing.tags = dict(body.get("tags") or existing.tags)
            self._save(existing)
            nic, created = existing, False
        else:
            guid = str(uuid.uuid4())
            nic = Nic(
                name=name, id=nic_id, resource_group=rg, location=body["location"],
                properties=dict(body["properties"]), tags=dict(body.get("tags") or {}), resource_guid=guid,
                mac_address=_mac(), private_ip=self.sandboxes.allocate(guid), address_key=guid,
            )
            self.nics[nic.id.lower()] = nic
            self._save(nic)
            created = True

        async def done(op: Operation) -> None:
            return None

        return nic, self._operation("NetworkInterfaces_CreateOrUpdate", done), created

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

    # ----- eviction ----------------------------------------------------------------------
    def simulate_eviction(self, inst: Instance) -> None:
        """Post a Preempt scheduled event; evict at NotBefore (or once the VM approved it)."""
        if not inst.is_spot:
            raise errors.ArmError(
                409, "OperationNotAllowed",
                f"Simulate eviction is only supported for Spot virtual machines; '{inst.name}' has priority "
                f"'{inst.priority}'.",
            )
        if inst.power_state != "running" or inst.vm_id in self._evictions:
            return
        event_id = str(uuid.uuid4()).upper()
        not_before = datetime.now(timezone.utc) + timedelta(seconds=self.config.eviction_notice)
        event = {
            "EventId": event_id,
            "EventType": "Preempt",
            "ResourceType": "VirtualMachine",
            "Resources": [inst.name],
            "EventStatus": "Scheduled",
            "NotBefore": format_datetime(not_before, usegmt=True),
            "Description": "The Spot virtual machine is being evicted.",
            "EventSource": "Platform",
            "DurationInSeconds": -1,
        }
        acked = asyncio.Event()
        self._evictions[inst.vm_id] = (event_id, acked)
        self.sandboxes.post_scheduled_event(inst.vm_id, event)
        self._spawn(self._evict(inst, acked, self.config.eviction_notice))

    def event_acknowledged(self, key: str, event_id: str) -> None:
        """SandboxHost's on_event_ack: the VM approved an event early (thread-safe)."""
        pending = self._evictions.get(key)
        if pending is None or pending[0].lower() != event_id.lower():
            return
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(pending[1].set)
        else:
            pending[1].set()

    async def _evict(self, inst: Instance, acked: asyncio.Event, notice: float) -> None:
        try:
            await asyncio.wait_for(acked.wait(), timeout=notice)
        except asyncio.TimeoutError:
            pass
        if self._evictions.pop(inst.vm_id, None) is None:
            return  # deleted meanwhile
        if inst.eviction_policy == "Deallocate":
            await self.sandboxes.kill(inst.vm_id)
            self.sandboxes.clear_scheduled_events(inst.vm_id)
            inst.power_state = "deallocated"
            self._save(inst)
            return
        await self.sandboxes.kill(inst.vm_id)
        await self._remove_instance(inst)
        if inst.scale_set_id:
            ss = self.scale_sets.get(inst.scale_set_id.lower())
            if ss is not None:
                ss.sku["capacity"] = max(0, ss.sku["capacity"] - 1)
                self._save(ss)

    def _cancel_eviction(self, inst: Instance) -> None:
        self._evictions.pop(inst.vm_id, None)

    # ----- admin faults on instances ------------------------------------------------------
    async def kill(self, inst: Instance) -> None:
        """Abrupt death of the guest: processes gone, ARM keeps the VM, powered off ("stopped")."""
        await self.sandboxes.kill(inst.vm_id)
        inst.power_state = "stopped"
        self._save(inst)

    async def drop_ssh(self, inst: Instance) -> None:
        await self.sandboxes.drop_ssh(inst.vm_id)

    # ----- IMDS and descriptions ---------------------------------------------------------
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

    def live_instances(self) -> int:
        return sum(1 for i in self.instances.values() if i.power_state == "running")


def _creation_order(inst: Instance) -> tuple[int, str]:
    return (int(inst.instance_id) if inst.instance_id is not None else 0, inst.time_created)


def _regular_count(capacity: int, mix: dict[str, Any]) -> int:
    base = int(mix.get("baseRegularPriorityCount") or 0)
    pct = int(mix.get("regularPriorityPercentageAboveBase") or 0)
    if capacity <= base:
        return capacity
    return base + math.ceil((capacity - base) * pct / 100)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _mac() -> str:
    return "00-0D-3A-" + "-".join(f"{b:02X}" for b in secrets.token_bytes(3))


def _public_keys(os_profile: dict[str, Any]) -> list[str]:
    ssh = (os_profile.get("linuxConfiguration") or {}).get("ssh") or {}
    return [k["keyData"].strip() for k in ssh.get("publicKeys") or [] if k.get("keyData")]


def _delete_option(inst: Instance, nic_id: str) -> str:
    for ref in inst.properties.get("networkProfile", {}).get("networkInterfaces", []):
        if ref.get("id", "").lower() == nic_id.lower():
            return (ref.get("properties") or {}).get("deleteOption", "Detach")
    return "Detach"


def _check_max_price(profile: dict[str, Any]) -> None:
    max_price = (profile.get("billingProfile") or {}).get("maxPrice")
    if max_price is None:
        return
    if profile.get("priority") != "Spot":
        raise errors.invalid_parameter(
            "billingProfile.maxPrice can only be set when priority is Spot.", "billingProfile.maxPrice")
    if not (max_price == -1 or max_price > 0):
        raise errors.ArmError(
            400, "MaxPriceValueInvalid",
            f"The max price {max_price} is invalid: use -1 (never evict because of price) or a positive "
            "price in US dollars per hour.", target="billingProfile.maxPrice",
        )


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


