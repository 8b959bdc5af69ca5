"""A scale set this process provisions into: created if missing, grown, listed, shrunk, deleted.

Request economy (the original PUT the whole model per grow and listed through Resource Graph):

- `grow(n)`: one GET (does it exist, what capacity), the quota check (SKU list once per process,
  one usages list), then ONE write: PUT of the full model when creating, PATCH of `sku.capacity`
  otherwise. It returns without waiting for instances to boot; the long-running operation is
  followed in the background and its failure (e.g. AllocationFailed) is raised by the next
  `instances()` or `grow()`, after the failed instances it left were deleted.
- `instances()`: the VMs (with instance view) and the NICs (for private IPs): two paged lists,
  fetched concurrently, whatever the number of instances.
- `delete_instances(ids)`: one POST for the whole batch.
- `delete_if_empty()`: deletes the scale set only if THIS object created it (the original also
  deleted pre-existing scale sets at exit).

Priority mix (spot with a base of regular instances and/or a regular percentage above it)
switches the scale set to Flexible orchestration with `priorityMixPolicy`, as AzManagers does;
a Flexible scale set's instances are listed as plain VMs filtered by scale set, and its NICs from
the resource group's NIC list (the VMSS VM/NIC list APIs are Uniform-only).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from azure.core import MatchConditions

from prefect_azmanagers.azure.bootscript import boot_log_tail
from prefect_azmanagers.azure.clients import collect, delete_and_wait
from prefect_azmanagers.azure.errors import arm_errors
from prefect_azmanagers.azure.lease import LEASE_TAG, RENEW_EVERY, TTL, lease_tag, read_lease
from prefect_azmanagers.azure.provisioning import ProvisioningOptions
from prefect_azmanagers.azure.quota import ensure_quota, priority_split
from prefect_azmanagers.exceptions import (
    AllocationFailed,
    AzureError,
    ConfigurationError,
    ResourceMissing,
    ScaleSetInUse,
    TemplateError,
)

logger = logging.getLogger("prefect_azmanagers.azure")

FLEXIBLE_NETWORK_API_VERSION = "2020-11-01"
MAX_FAILURE_LOGS = 3   # failed instances whose boot log goes into the error message
MAX_TAG_WRITES = 5     # tag updates refused with 412 (written meanwhile) before giving up


@dataclass(frozen=True)
class Instance:
    """One instance of a scale set, as the control plane sees it."""

    name: str
    instance_id: str          # Uniform: "0", "1", ...; Flexible: the VM name (what delete takes)
    vm_id: str
    computer_name: str
    provisioning_state: str   # "Creating" | "Succeeded" | "Failed" | ...
    power_state: str | None   # "running" | "stopped" | "deallocated" | None
    private_ip: str | None
    priority: str | None      # "Regular" | "Spot"


def power_state(instance_view: dict) -> str | None:
    """"running", "stopped", "deallocated", ... from an instance view's PowerState status."""
    for status in instance_view.get("statuses") or []:
        code = status.get("code") or ""
        if code.startswith("PowerState/"):
            return code.split("/", 1)[1]
    return None


def _ips_by_vm(nics: list[dict]) -> dict[str, str]:
    """Primary private IP of each VM (lower-cased VM resource id -> IP) from NIC documents."""
    ips: dict[str, str] = {}
    for nic in nics:
        props = nic.get("properties") or {}
        vm = ((props.get("virtualMachine") or {}).get("id") or "").lower()
        if not vm:
            continue
        configs = props.get("ipConfigurations") or []
        primary = next((c for c in configs if (c.get("properties") or {}).get("primary")), None)
        for config in ([primary] if primary else []) + configs:
            ip = (config.get("properties") or {}).get("privateIPAddress")
            if ip:
                ips.setdefault(vm, ip)
                break
    return ips


def _capacity(vmss: dict | None) -> int:
    return int(((vmss or {}).get("sku") or {}).get("capacity") or 0)


async def delete_scaleset(clients: Any, resource_group: str, name: str) -> None:
    """Delete a scale set and its instances, waiting for completion (already gone is fine)."""
    await delete_and_wait(f"delete scale set {name}", clients.compute.virtual_machine_scale_sets.begin_delete(
        resource_group, name, force_deletion=True))


class ScaleSet:
    """A scale set this process provisions into: created if missing (then owned: deleted when
    empty), grown in one request, listed, shrunk in one request.

    `created` is True once this object has sent the request that creates the scale set (also
    when that request was interrupted), so a cleanup after Ctrl-C deletes it. As an async
    context manager it releases what it made when the block exits with an error or is
    cancelled (Ctrl-C under asyncio.run), and only stops its background work otherwise.
    """

    def __init__(self, clients: Any, manifest: Any, template: Any, name: str, *,
                 custom_data: str, tags: dict[str, str],
                 provisioning: ProvisioningOptions = ProvisioningOptions(),
                 eviction_policy: str = "Delete", quota_wait: float = 0.0,
                 resource_group: str | None = None, lease_holder: str | None = None,
                 boot_log: Callable[[Instance], Awaitable[str]] | None = None):
        self.clients = clients
        self.manifest = manifest
        self.template = template
        self.name = name
        self.resource_group = resource_group or template.resource_group or manifest.resource_group
        if not self.resource_group:
            raise TemplateError(f"No resource group for scale set {name}: set it in the template or manifest.")
        self.custom_data = custom_data
        self.tags = dict(tags)
        self.provisioning = provisioning
        if eviction_policy not in ("Delete", "Deallocate"):
            raise ConfigurationError(f"eviction_policy must be 'Delete' or 'Deallocate', not {eviction_policy!r}.")
        self.eviction_policy = eviction_policy
        self.lease_holder = lease_holder   # a cluster id: hold the scale set's lease (lease.py)
        # Reads a failed instance's boot log for the error (the data plane's pinned SSH);
        # without one, an address is read only with a key already pinned for it.
        self.boot_log = boot_log or self._boot_log_by_address
        self._renewer: asyncio.Task | None = None
        self.quota_wait = quota_wait
        self.created = False
        self._id = (f"/subscriptions/{clients.subscription_id}"
                    f"/resourceGroups/{self.resource_group}/providers/Microsoft.Compute"
                    f"/virtualMachineScaleSets/{name}")
        self._flexible: bool | None = None
        self._watchers: set[asyncio.Task] = set()
        self._failure: AzureError | None = None
        self._preexisting: set[str] | None = None   # instance ids before our first grow of a set we did not create
        # Serialises capacity writes: two concurrent grows must not both PATCH old + n.
        self._capacity_lock = asyncio.Lock()
        self._writes = 0   # capacity writes sent by this object (a grow re-reads if it changed)
        # Held while a failed grow's instances (and maybe the emptied scale set) are deleted:
        # no grow is sent meanwhile, so none lands in a scale set being deleted.
        self._failure_lock = asyncio.Lock()

    # -- model -----------------------------------------------------------------------------

    @property
    def pending_grows(self) -> int:
        """Grows sent and not finished yet (their instances may still appear)."""
        return len(self._watchers)

    def _location(self) -> str:
        location = self.template.value.get("location") or getattr(self.manifest, "location", None)
        if not location:
            raise TemplateError(
                f"The template of scale set {self.name} has no location: set value.location in the "
                "template (build_sstemplate's location=) or location in the manifest.")
        return location

    def _sku_name(self) -> str:
        try:
            return self.template.value["sku"]["name"]
        except (KeyError, TypeError):
            raise TemplateError(
                "The scale-set template has no sku.name (the VM size): set value.sku.name, e.g. "
                "Standard_D8s_v3 (build_sstemplate's sku_name=).") from None

    def body(self, capacity: int) -> dict:
        """The ARM body (camelCase) that creates this scale set with `capacity` instances."""
        self._sku_name()
        value = copy.deepcopy(self.template.value)
        try:
            props = value["properties"]
            profile = props["virtualMachineProfile"]
            os_profile = profile["osProfile"]
        except (KeyError, TypeError):
            raise TemplateError(
                "The scale-set template's value lacks properties.virtualMachineProfile.osProfile; "
                "rebuild it with build_sstemplate.") from None
        value["sku"]["capacity"] = capacity
        value.setdefault("location", self._location())
        value["tags"] = {**(value.get("tags") or {}), **self.tags,
                         **(lease_tag(self.lease_holder) if self.lease_holder else {})}
        # The driver logs in as manifest.ssh_user with the manifest's key: that is the admin.
        admin = self.manifest.ssh_user or os_profile.get("adminUsername")
        os_profile["adminUsername"] = admin
        os_profile["computerNamePrefix"] = f"{self.name}-"   # as AzManagers: "<scale set>-"
        os_profile["customData"] = self.custom_data
        linux = os_profile.setdefault("linuxConfiguration", {})
        keys = linux.setdefault("ssh", {}).setdefault("publicKeys", [])
        key_data = self.manifest.read_public_key().strip()
        if not any(k.get("keyData", "").strip() == key_data for k in keys):
            keys.append({"path": f"/home/{admin}/.ssh/authorized_keys", "keyData": key_data})
        storage = profile.setdefault("storageProfile", {})
        if self.provisioning.os_disk_size:
            storage.setdefault("osDisk", {})["diskSizeGB"] = self.provisioning.os_disk_size
        apply_image_override(storage, self.provisioning.image_name, self.provisioning.image_version)
        if self.provisioning.spot:
            profile["priority"] = "Spot"
            profile["evictionPolicy"] = self.eviction_policy
            profile["billingProfile"] = {"maxPrice": self.provisioning.max_price}
        if self.provisioning.priority_mix:
            props["orchestrationMode"] = "Flexible"
            props["priorityMixPolicy"] = {
                "baseRegularPriorityCount": self.provisioning.spot_base_regular_priority_count,
                "regularPriorityPercentageAboveBase": self.provisioning.spot_regular_percentage_above_base,
            }
            props["platformFaultDomainCount"] = 1
            profile.setdefault("networkProfile", {})["networkApiVersion"] = FLEXIBLE_NETWORK_API_VERSION
            for key in ("overprovision", "doNotRunExtensionsOnOverprovisionedVMs", "upgradePolicy"):
                props.pop(key, None)
        return value

    def _new_instances(self, old: int, new: int) -> tuple[int, int]:
        """(regular, spot) instances added when capacity goes from old to new."""
        if not self.provisioning.spot:
            return new - old, 0
        if not self.provisioning.priority_mix:
            return 0, new - old
        r_old, s_old = priority_split(old, self.provisioning.spot_base_regular_priority_count, self.provisioning.spot_regular_percentage_above_base)
        r_new, s_new = priority_split(new, self.provisioning.spot_base_regular_priority_count, self.provisioning.spot_regular_percentage_above_base)
        return r_new - r_old, s_new - s_old

    # -- operations ------------------------------------------------------------------------

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    async def _get(self) -> dict | None:
        try:
            with arm_errors(f"read scale set {self.name}"):
                vmss = await self.clients.compute.virtual_machine_scale_sets.get(self.resource_group, self.name)
        except ResourceMissing:
            return None
        raw = vmss.as_dict()
        self._id = raw.get("id") or self._id
        self._flexible = (raw.get("properties") or {}).get("orchestrationMode") == "Flexible"
        return raw

    async def grow(self, n: int) -> None:
        """Add n instances in one request (after the quota check); does not wait for them to boot."""
        if n < 1:
            raise ValueError(f"grow(n) needs n >= 1, got {n}")
        self._raise_failure()
        writes_seen = self._writes
        current = await self._get()
        if current is not None and not self.created:
            await self._take_lease(current)
        old = _capacity(current)
        regular, spot = self._new_instances(old, old + n)
        await ensure_quota(self.clients, (current or {}).get("location") or self._location(),
                           self._sku_name(), regular=regular, spot=spot, wait=self.quota_wait)
        async with self._failure_lock, self._capacity_lock:
            self._raise_failure()   # a grow that failed meanwhile, now cleaned up
            if self._writes != writes_seen:   # another grow/delete of ours went first: re-read
                current = await self._get()
                old = _capacity(current)
            poller = await self._request_growth(current, old, n)
            self._writes += 1
        logger.info("Scale set %s: capacity %d -> %d", self.name, old, old + n)
        task = asyncio.get_running_loop().create_task(self._follow(poller, old + n))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _request_growth(self, current: dict | None, old: int, n: int) -> Any:
        """Send the one write that takes the capacity from old to old + n; returns its poller."""
        vmss_ops = self.clients.compute.virtual_machine_scale_sets
        if current is None:
            body = self.body(old + n)
            self.created = True
            try:
                # If-None-Match: * -- a scale set another process created meanwhile is not
                # overwritten (both would count the same instances as theirs).
                with arm_errors(f"create scale set {self.name} with {n} instances"):
                    poller = await vmss_ops.begin_create_or_update(
                        self.resource_group, self.name, body, match_condition=MatchConditions.IfMissing)
            except AzureError as exc:
                self.created = False   # refused outright: nothing was made
                if exc.status == 412 and (raced := await self._get()) is not None:
                    await self._take_lease(raced)   # raises ScaleSetInUse if its holder lives
                raise
            self._flexible = self.provisioning.priority_mix
            self._keep_lease()
            return poller
        if self._preexisting is None and not self.created:
            self._preexisting = {i.instance_id for i in await self._list()}
        with arm_errors(f"grow scale set {self.name} from {old} to {old + n} instances"):
            return await vmss_ops.begin_update(self.resource_group, self.name, {"sku": {"capacity": old + n}})

    async def _follow(self, poller: Any, capacity: int) -> None:
        """Wait for a grow to finish; on failure delete the instances it left Failed, keep the error."""
        try:
            with arm_errors(f"provision scale set {self.name} to {capacity} instances"):
                await poller.result()
        except AzureError as exc:
            logger.warning("Scale set %s: provisioning failed: %s", self.name, exc)
            async with self._failure_lock:
                try:
                    # Instances that were never allocated have no boot log to read.
                    logs = await self._remove_failed(read_logs=not isinstance(exc, AllocationFailed))
                except AzureError as cleanup_exc:
                    logger.warning("Scale set %s: could not delete failed instances: %s", self.name, cleanup_exc)
                    logs = ""
                self._failure = type(exc)(f"{exc}{logs}", code=exc.code, status=exc.status) if logs else exc

    async def _remove_failed(self, *, read_logs: bool) -> str:
        """Delete the instances left Failed (and the scale set if it was ours and is now empty);
        returns the boot-log tails of a few of them, read over SSH before deletion."""
        instances = await self._list()
        failed = [i for i in instances if i.provisioning_state.lower() == "failed"]
        reachable = [i for i in failed if i.private_ip and read_logs][:MAX_FAILURE_LOGS]
        tails = await asyncio.gather(*(self.boot_log(i) for i in reachable))
        if failed:
            await self.delete_instances([i.instance_id for i in failed])
        if self.created and len(failed) == len(instances):
            await self.delete()
        return "".join(f"\n\nBoot log of {i.name}:\n{tail}" for i, tail in zip(reachable, tails))

    async def _boot_log_by_address(self, instance: Instance) -> str:
        return await boot_log_tail(instance.private_ip, admin_username=self.manifest.ssh_user,
                                   manifest=self.manifest, connect_timeout=10, lines=30)

    async def wait_provisioned(self) -> None:
        """Wait until every grow sent so far finished; raise its failure if one failed."""
        while self._watchers:
            await asyncio.gather(*list(self._watchers))
        self._raise_failure()

    async def instances(self) -> list[Instance]:
        """Every instance with its states and private IP (two paged lists: VMs and NICs).

        Raises the failure of an earlier grow (e.g. AllocationFailed) once, after its failed
        instances were deleted.
        """
        self._raise_failure()
        return await self._list()

    async def _list(self) -> list[Instance]:
        if self._flexible is None and await self._get() is None:
            return []
        compute, network = self.clients.compute, self.clients.network
        rg = self.resource_group
        if self._flexible:
            vm_pages = compute.virtual_machines.list(
                rg, filter=f"'virtualMachineScaleSet/id' eq '{self._id}'", expand="instanceView")
            nic_pages = network.network_interfaces.list(rg)
        else:
            vm_pages = compute.virtual_machine_scale_set_vms.list(rg, self.name, expand="instanceView")
            nic_pages = network.network_interfaces.list_virtual_machine_scale_set_network_interfaces(rg, self.name)
        try:
            with arm_errors(f"list the instances of scale set {self.name}"):
                vms, nics = await asyncio.gather(collect(vm_pages), collect(nic_pages))
        except ResourceMissing:
            return []   # the scale set is gone
        ips = _ips_by_vm(nics)
        default_priority = "Spot" if self.provisioning.spot else "Regular"
        found = []
        for vm in vms:
            props = vm.get("properties") or {}
            view = props.get("instanceView") or {}
            found.append(Instance(
                name=vm.get("name", ""),
                instance_id=vm.get("name", "") if self._flexible else str(vm.get("instanceId", "")),
                vm_id=props.get("vmId", ""),
                computer_name=(props.get("osProfile") or {}).get("computerName") or view.get("computerName") or "",
                provisioning_state=props.get("provisioningState") or "Unknown",
                power_state=power_state(view),
                private_ip=ips.get((vm.get("id") or "").lower()),
                priority=props.get("priority") or default_priority,
            ))
        return found

    async def delete_instances(self, instance_ids: list[str]) -> list[str]:
        """Delete these instances in one request and wait; instances already gone are fine
        (if some of a batch are gone, the rest are deleted in one more request). Returns the
        ids that were gone already (deleted or evicted behind the caller's back)."""
        if not instance_ids:
            return []
        try:
            with arm_errors(f"delete {len(instance_ids)} instances of scale set {self.name}"):
                async with self._capacity_lock:   # the request lowers the capacity a grow reads
                    self._writes += 1
                    poller = await self.clients.compute.virtual_machine_scale_sets.begin_delete_instances(
                        self.resource_group, self.name, {"instanceIds": list(instance_ids)})
                await poller.result()
        except ResourceMissing:
            present = {i.instance_id for i in await self._list()}
            remaining = [i for i in instance_ids if i in present]
            logger.debug("Scale set %s: some of %s already gone; deleting %s", self.name, instance_ids, remaining)
            if remaining and len(remaining) < len(instance_ids):
                await self.delete_instances(remaining)
            return [i for i in instance_ids if i not in present]
        return []

    async def simulate_eviction(self, instance_id: str) -> None:
        """ARM's simulateEviction of one spot instance (Uniform: its instance id)."""
        with arm_errors(f"simulate the eviction of instance {instance_id} of {self.name}"):
            if self._flexible:
                await self.clients.compute.virtual_machines.simulate_eviction(
                    self.resource_group, instance_id)
            else:
                await self.clients.compute.virtual_machine_scale_set_vms.simulate_eviction(
                    self.resource_group, self.name, instance_id)

    async def delete_if_empty(self) -> bool:
        """Delete the scale set if this object created it and it has no instance left."""
        if not self.created:
            return False
        current = await self._get()
        if current is None:
            self.created = False
            return True
        if _capacity(current) > 0 and await self._list():
            return False
        await self.delete()
        return True

    async def delete(self) -> None:
        """Delete the scale set and all its instances, waiting for completion (idempotent)."""
        await self.close(release_lease=False)
        await delete_scaleset(self.clients, self.resource_group, self.name)
        self.created = False

    async def release(self) -> None:
        """Delete everything this object made: the scale set if it created it, else the
        instances it added to someone else's scale set (the ones that were not there before)."""
        if self.created:
            await self.delete()
            return
        await self.close()
        if self._preexisting is not None:
            ours = [i.instance_id for i in await self._list() if i.instance_id not in self._preexisting]
            await self.delete_instances(ours)

    async def __aenter__(self) -> ScaleSet:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        """On an error or interruption (Ctrl-C cancels the task) release what was made."""
        if exc_type is None:
            await self.close()
            return
        logger.warning("Scale set %s: %s; deleting what this process made", self.name, exc_type.__name__)
        await self.release()

    async def close(self, *, release_lease: bool = True) -> None:
        """Stop following grows and renewing the lease in the background (nothing is
        deleted); the lease is dropped unless the scale set is about to be deleted."""
        current = asyncio.current_task()
        renewer, self._renewer = self._renewer, None
        tasks = [t for t in (*self._watchers, renewer) if t is not None and t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if renewer is not None and release_lease:
            try:
                await self._write_tags(self._unleased)
            except AzureError as exc:
                logger.warning("Scale set %s: could not drop its lease (it expires in %.0f s): %s",
                               self.name, TTL, exc)

    # -- lease -----------------------------------------------------------------------------

    async def _take_lease(self, current: dict) -> None:
        """Before growing a scale set this object did not create: refuse one that another live
        cluster holds, else take its lease and keep renewing it. `current` is the scale set
        as the caller read it; the lease is written only if it is unchanged since (If-Match)."""
        if self.lease_holder is None or self._renewer is not None:
            return
        await self._write_tags(self._leased, current)
        self._keep_lease()

    def _leased(self, tags: dict[str, str]) -> dict[str, str]:
        """`tags` with this object's lease, renewed; ScaleSetInUse if another live cluster holds it."""
        lease = read_lease(tags)
        if lease is not None and lease.holder != self.lease_holder and lease.live():
            raise ScaleSetInUse(
                f"Scale set {self.name} is in use by {lease.describe()}, created by "
                f"{tags.get('azmanagers-creator', 'someone else')}. Two clusters growing one "
                "scale set would take each other's instances: leave group= unset (each cluster "
                "then gets a scale set of its own), or name another scale set.")
        return {**tags, **lease_tag(self.lease_holder)}

    def _unleased(self, tags: dict[str, str]) -> dict[str, str]:
        """`tags` without this object's lease (another holder's, taken after ours expired, stays)."""
        lease = read_lease(tags)
        if lease is None or lease.holder != self.lease_holder:
            return tags
        return {k: v for k, v in tags.items() if k != LEASE_TAG}

    def _keep_lease(self) -> None:
        if self.lease_holder is not None and self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_lease())

    async def _renew_lease(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            try:
                await self._write_tags(self._leased)
            except ResourceMissing:
                return
            except ScaleSetInUse as exc:   # ours expired (e.g. ARM unreachable for TTL) and was taken
                logger.error("Scale set %s: its lease was lost: %s", self.name, exc)
                return
            except AzureError as exc:  # the next renewal may work; the lease lasts TTL
                logger.warning("Scale set %s: renewing its lease failed: %s", self.name, exc)

    async def _write_tags(self, change: Callable[[dict[str, str]], dict[str, str]],
                          current: dict | None = None) -> None:
        """PATCH the scale set's tags to `change(tags)`, only if the scale set is unchanged since
        it was read (If-Match on its etag): a concurrent write (another cluster's lease, a
        capacity change) makes ARM answer 412, and the scale set is read again and `change`
        applied anew, so it always decides on what it overwrites. `current`: a fresh read to
        start from. `change` may raise to refuse; nothing is written when it changes nothing."""
        for _ in range(MAX_TAG_WRITES):
            if current is None:
                current = await self._get()
            if current is None:
                return
            tags = dict(current.get("tags") or {})
            changed = change(tags)
            if changed == tags:
                return
            try:
                with arm_errors(f"update the tags of scale set {self.name}"):
                    poller = await self.clients.compute.virtual_machine_scale_sets.begin_update(
                        self.resource_group, self.name, {"tags": changed},
                        etag=current["etag"], match_condition=MatchConditions.IfNotModified)
                    await poller.result()
                return
            except AzureError as exc:
                if exc.status != 412:
                    raise
                current = None   # written meanwhile: read it again
        raise AzureError(f"Scale set {self.name}: its tags changed under each of {MAX_TAG_WRITES} "
                         "updates in a row; another process keeps writing it. Try again.")


def apply_image_override(storage: dict, image_name: str | None, image_version: str | None) -> None:
    """Point storageProfile.imageReference at another image name and/or gallery image version.

    The reference id has the form `.../galleries/G/images/I[/versions/V]` (gallery image) or
    `.../images/I` (managed image); a name replaces I, a version sets V (gallery images only).
    """
    if not image_name and not image_version:
        return
    ref = storage.get("imageReference") or {}
    image_id = ref.get("id")
    if not image_id or "/images/" not in image_id:
        raise TemplateError(
            "An image name/version override needs a template whose storageProfile.imageReference "
            f"has an image id (.../images/NAME), found {ref!r}.")
    head, _, tail = image_id.partition("/images/")
    name, _, version = tail.partition("/versions/")
    if image_name:
        name = image_name
    if image_version:
        if "/galleries/" not in head:
            raise TemplateError(
                f"An image version override needs a gallery image (.../galleries/G/images/I), but the "
                f"template's image is {image_id!r}: drop the version or use a gallery image.")
        version = image_version
    ref["id"] = f"{head}/images/{name}" + (f"/versions/{version}" if version else "")
    storage["imageReference"] = ref


@dataclass(frozen=True)
class ScaleSetInfo:
    """A scale set of a resource group, as `scalesets list` shows it."""

    name: str
    capacity: int
    orchestration_mode: str
    provisioning_state: str
    tags: dict


async def list_scalesets(clients: Any, resource_group: str) -> list[ScaleSetInfo]:
    """Every scale set of the resource group (one paged list)."""
    found = []
    with arm_errors(f"list the scale sets of resource group {resource_group}"):
        async for item in clients.compute.virtual_machine_scale_sets.list(resource_group):
            raw = item.as_dict()
            props = raw.get("properties") or {}
            found.append(ScaleSetInfo(raw["name"], int((raw.get("sku") or {}).get("capacity") or 0),
                                      props.get("orchestrationMode") or "Uniform",
                                      props.get("provisioningState") or "", dict(raw.get("tags") or {})))
    return found
