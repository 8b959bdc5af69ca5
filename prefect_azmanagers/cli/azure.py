"""`prefect-azmanagers scalesets|vms ...` and `cleanup`: what this package created in Azure
(or the local cloud), and removing what a crashed process left behind.

```
prefect-azmanagers scalesets list                       # scale sets of the manifest's resource group
prefect-azmanagers scalesets delete azm --yes           # delete one (and its instances)
prefect-azmanagers vms list                             # standalone VMs made by prefect-azmanagers
prefect-azmanagers cleanup --older-than 2h --dry-run    # show orphans, then run without --dry-run
```
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from prefect_azmanagers.azure.clients import ArmClients
from prefect_azmanagers.azure.ownership import (
    CLUSTER_TAG,
    CREATED_TAG,
    CREATOR_TAG,
    delete_orphan,
    find_orphans,
)
from prefect_azmanagers.azure.scaleset import delete_scaleset, list_scalesets
from prefect_azmanagers.azure.vm import list_vms
from prefect_azmanagers.blocks import load_manifest
from prefect_azmanagers.cli.common import MANIFEST_OPTION, exit_with_error

scalesets_app = typer.Typer(no_args_is_help=True, help="Scale sets created by prefect-azmanagers.")
vms_app = typer.Typer(no_args_is_help=True, help="Standalone (detached) VMs created by prefect-azmanagers.")

_console = Console()
T = TypeVar("T")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """'90s', '30m', '2h', '1d' or plain seconds -> timedelta; typer.BadParameter otherwise."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration; use e.g. 90s, 30m, 2h or 1d.")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def _ownership_columns(tags: dict[str, str]) -> tuple[str, str, str]:
    """The creator, cluster and created tags of a resource, as the list commands show them."""
    return tags.get(CREATOR_TAG, ""), tags.get(CLUSTER_TAG, ""), tags.get(CREATED_TAG, "")


def _with_clients(manifest_name: str, work: Callable[[ArmClients, str], Awaitable[T]]) -> T:
    manifest = load_manifest(manifest_name)

    async def main() -> T:
        async with ArmClients(manifest) as clients:
            return await work(clients, manifest.resource_group)

    return asyncio.run(main())


@scalesets_app.command("list")
def scalesets_list(
    manifest: str = MANIFEST_OPTION,
    all_: bool = typer.Option(False, "--all", help="Also scale sets not made by prefect-azmanagers."),
) -> None:
    """List the scale sets of the manifest's resource group.

    Example: prefect-azmanagers scalesets list --manifest localcloud
    """
    found = _with_clients(manifest, list_scalesets)
    table = Table("name", "capacity", "mode", "state", "creator", "cluster", "created")
    for s in found:
        if all_ or CLUSTER_TAG in s.tags:
            table.add_row(s.name, str(s.capacity), s.orchestration_mode, s.provisioning_state,
                          *_ownership_columns(s.tags))
    _console.print(table)


@scalesets_app.command("delete")
def scalesets_delete(
    name: str = typer.Argument(..., help="Scale set name."),
    manifest: str = MANIFEST_OPTION,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a scale set and all its instances, and wait until it is gone.

    Example: prefect-azmanagers scalesets delete azm --yes
    """
    if not yes:
        typer.confirm(f"Delete scale set {name} and all its instances?", abort=True)

    async def work(clients: ArmClients, rg: str) -> bool:
        # ARM answers a DELETE of a missing resource with 204: look first to say which it was.
        if name not in {s.name for s in await list_scalesets(clients, rg)}:
            return False
        await delete_scaleset(clients, rg, name)
        return True

    deleted = _with_clients(manifest, work)
    _console.print(f"Deleted scale set {name}." if deleted else f"Scale set {name} did not exist.")


@vms_app.command("list")
def vms_list(
    manifest: str = MANIFEST_OPTION,
    all_: bool = typer.Option(False, "--all", help="Also VMs not made by prefect-azmanagers."),
) -> None:
    """List the standalone VMs of the manifest's resource group with their private IPs.

    Example: prefect-azmanagers vms list
    """
    found = _with_clients(manifest, list_vms)
    table = Table("name", "private ip", "creator", "cluster", "created")
    for vm in found:
        if all_ or CLUSTER_TAG in vm.tags:
            table.add_row(vm.name, vm.private_ip, *_ownership_columns(vm.tags))
    _console.print(table)


def cleanup(
    older_than: str = typer.Option("0s", "--older-than", help="Only resources created longer ago (90s, 30m, 2h, 1d)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be deleted."),
    all_users: bool = typer.Option(False, "--all-users", help="Also resources other user@host made."),
    include_detached: bool = typer.Option(False, "--include-detached", help="Also detached VMs (long-lived by design)."),
    manifest: str = MANIFEST_OPTION,
) -> None:
    """Find and delete orphans: tagged scale sets, VMs and unattached NICs a crashed process left.

    By default only your own (user@host) resources, and never detached VMs.
    Example: prefect-azmanagers cleanup --older-than 2h --dry-run
    """
    age = parse_duration(older_than)

    async def work(clients: ArmClients, rg: str) -> list[Any]:
        orphans = await find_orphans(clients, rg, older_than=age, all_creators=all_users,
                                     include_detached=include_detached)
        table = Table("kind", "name", "creator", "cluster", "created", "why")
        for o in orphans:
            table.add_row(o.kind, o.name, o.creator, o.cluster_id,
                          o.created.isoformat() if o.created else "?", o.reason)
        _console.print(table)
        if not dry_run:
            # Scale sets and VMs first: their NICs go with them.
            for orphan in sorted(orphans, key=lambda o: o.kind == "nic"):
                await delete_orphan(clients, orphan)
        return orphans

    orphans = _with_clients(manifest, work)
    verb = "Would delete" if dry_run else "Deleted"
    _console.print(f"{verb} {len(orphans)} resource(s).")


def usage(
    cluster: str = typer.Argument(None, help="A cluster id or scale-set name (default: the "
                                  "most recent clusters)."),
    last: int = typer.Option(5, "--last", help="How many recent clusters to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON."),
) -> None:
    """What clusters on this machine used: instances, instance-hours by priority, evictions,
    re-queued calls, peak and mean workers (saved every minute while they run, and at close)."""
    import dataclasses
    import json

    from prefect_azmanagers.cluster.usage import saved

    records = [r for r in saved() if cluster in (None, r["cluster_id"], r["group"])][:last]
    if not records:
        exit_with_error(f"no usage saved for cluster {cluster}" if cluster else
                        "no usage saved yet: clusters save theirs under ~/.azmanagers/usage")
    if as_json:
        typer.echo(json.dumps([dict(r, usage=dataclasses.asdict(r["usage"])) for r in records],
                              indent=2))
        return
    table = Table("cluster", "scale set", "updated", "instances", "instance-hours", "evictions",
                  "re-queued", "workers peak / mean")
    for record in records:
        report = record["usage"]
        hours = ", ".join(f"{p.lower()} {h:.3f}" for p, h in sorted(report.instance_hours.items()))
        table.add_row(record["cluster_id"], record["group"], record["updated"], str(report.instances),
                      hours or "0", str(report.evictions), str(report.requeued),
                      f"{report.peak_workers} / {report.mean_workers:.1f}")
    _console.print(table)
