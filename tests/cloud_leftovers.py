"""What the session's local cloud still holds under a name prefix: ARM VMs and NICs (through
the Azure SDK) and local-cloud instances. The leftover checks of the detached and azure-vm
worker tests poll this every second or two, so the `localcloud` manifest is loaded once per
local cloud: a block load costs ~80 ms of CPU on a 2-core machine (a new API client, with its
TLS context, and a block read), two thirds of one poll."""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=4)
def _manifest(admin_endpoint: str) -> Any:
    """The `localcloud` manifest of the local cloud at `admin_endpoint` (a new local cloud
    listens elsewhere, so it gets its manifest loaded afresh)."""
    from prefect_azmanagers.blocks import load_manifest

    return load_manifest("localcloud")


def cloud_leftovers(localcloud_info: dict, prefix: str) -> list[str]:
    """"ARM VM name", "ARM NIC name" and "local-cloud instance name" for each name starting
    with `prefix`, in the local cloud `localcloud_info` (its localcloud.json) describes."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    from prefect_azmanagers.azure.clients import ArmClients
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    manifest = _manifest(localcloud_info["admin_endpoint"])
    found: list[str] = []

    async def arm() -> None:
        async with ArmClients(manifest) as clients:
            found.extend([f"ARM VM {vm.name}" async for vm in
                          clients.compute.virtual_machines.list(manifest.resource_group)
                          if vm.name.startswith(prefix)])
            found.extend([f"ARM NIC {nic.name}" async for nic in
                          clients.network.network_interfaces.list(manifest.resource_group)
                          if nic.name.startswith(prefix)])

    run_coro_as_sync(arm())
    with LocalCloudAdmin.from_info(localcloud_info) as admin:
        found += [f"local-cloud instance {i['name']}" for i in admin.status()["instances"]
                  if i["name"].startswith(prefix)]
    return found
