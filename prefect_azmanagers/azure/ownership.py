"""Who made a resource: ownership tags, and finding the orphans a crashed process left behind.

Every scale set, VM and NIC this package creates carries tags: the creator (`user@host`), its pid,
the cluster (or detached VM) id, and the creation time (ISO 8601, UTC). `find_orphans` lists
the tagged resources of a resource group older than a threshold whose creating process is not
alive on this host (the pid tag) and that no live cluster holds (the lease tag, `lease.py`, renewed
by a running cluster on any host); `prefect-azmanagers cleanup` deletes them. Detached VMs are
meant to outlive their driver, so they are only orphans when asked for explicitly
(`include_detached`); a NIC of ours attached to no VM always is one.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from prefect_azmanagers.azure.errors import arm_errors
from prefect_azmanagers.azure.lease import read_lease
from prefect_azmanagers.azure.scaleset import delete_scaleset
from prefect_azmanagers.azure.vm import delete_nic, delete_vm

CREATOR_TAG = "azmanagers-creator"
CLUSTER_TAG = "azmanagers-cluster"
CREATED_TAG = "azmanagers-created"
KIND_TAG = "azmanagers-kind"   # "cluster" (scale-set workers) or "detached" (long-lived VM)
PID_TAG = "azmanagers-pid"     # the creating process: alive on this host -> not an orphan


def creator() -> str:
    """This process's `user@host`, as recorded in the creator tag."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def ownership_tags(cluster_id: str, *, kind: str = "cluster") -> dict[str, str]:
    """The tags to put on every resource made for `cluster_id`."""
    return {
        CREATOR_TAG: creator(),
        CLUSTER_TAG: cluster_id,
        CREATED_TAG: datetime.now(timezone.utc).isoformat(timespec="seconds"),
        KIND_TAG: kind,
        PID_TAG: str(os.getpid()),
    }


def _creator_alive(tags: dict[str, str], me: str) -> bool:
    """True if the resource's creator process still runs here (same user@host, live pid)."""
    if tags.get(CREATOR_TAG) != me or not tags.get(PID_TAG, "").isdigit():
        return False
    try:
        os.kill(int(tags[PID_TAG]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Orphan:
    kind: str            # "scaleset" | "vm" | "nic"
    name: str
    resource_group: str
    creator: str
    cluster_id: str
    created: datetime | None
    reason: str


def _created(tags: dict[str, str]) -> datetime | None:
    try:
        value = datetime.fromisoformat(tags.get(CREATED_TAG, ""))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


async def find_orphans(clients: Any, resource_group: str, *, older_than: timedelta = timedelta(0),
                       all_creators: bool = False, include_detached: bool = False) -> list[Orphan]:
    """Tagged scale sets, VMs and unattached NICs of the group older than `older_than` whose
    creating process is gone (a live creator on this host keeps its resources).

    Only this user@host's resources unless `all_creators`. Three paged list requests.
    """
    me = creator()
    cutoff = datetime.now(timezone.utc) - older_than
    found: list[Orphan] = []

    def consider(kind: str, raw: dict, reason: str) -> None:
        tags = raw.get("tags") or {}
        if CLUSTER_TAG not in tags or (not all_creators and tags.get(CREATOR_TAG) != me):
            return
        if _creator_alive(tags, me):
            return
        lease = read_lease(tags)
        if lease is not None and lease.live():
            return  # a live cluster, on whichever host, still uses it
        created = _created(tags)
        if created is not None and created > cutoff:
            return
        found.append(Orphan(kind, raw["name"], resource_group, tags.get(CREATOR_TAG, ""),
                            tags[CLUSTER_TAG], created, reason))

    with arm_errors(f"list the resources of resource group {resource_group}"):
        async for item in clients.compute.virtual_machine_scale_sets.list(resource_group):
            consider("scaleset", item.as_dict(), "scale set")
        async for item in clients.compute.virtual_machines.list(resource_group):
            raw = item.as_dict()
            if (raw.get("properties") or {}).get("virtualMachineScaleSet"):
                continue  # a Flexible scale set's member: goes with its scale set
            kind = (raw.get("tags") or {}).get(KIND_TAG)
            if kind == "azure-vm":
                continue  # a flow run's VM: its pool's worker deletes it, after a restart too
            if kind != "detached" or include_detached:
                consider("vm", raw, "detached VM" if kind == "detached" else "VM")
        async for item in clients.network.network_interfaces.list(resource_group):
            raw = item.as_dict()
            if not (raw.get("properties") or {}).get("virtualMachine"):
                consider("nic", raw, "NIC attached to no VM")
    return found


async def delete_orphan(clients: Any, orphan: Orphan) -> None:
    """Delete one orphan and wait for it to be gone (already gone is fine)."""
    if orphan.kind == "scaleset":
        await delete_scaleset(clients, orphan.resource_group, orphan.name)
    elif orphan.kind == "vm":
        await delete_vm(clients, orphan.resource_group, orphan.name)
    else:
        await delete_nic(clients, orphan.resource_group, orphan.name)
