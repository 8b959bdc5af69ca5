"""`prefect-azmanagers localcloud ...`: start, stop and inspect the offline ARM-compatible cloud.

```
prefect-azmanagers localcloud start --background      # saves manifest `localcloud` + templates
prefect-azmanagers localcloud status
prefect-azmanagers localcloud throttle 3              # next 3 ARM requests: 429 + Retry-After
prefect-azmanagers localcloud kill mycluster_0
prefect-azmanagers localcloud stop
```
"""

from __future__ import annotations

import json
import signal
from enum import Enum
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from prefect_azmanagers.cli.common import exit_with_error
from prefect_azmanagers.localcloud import AdminError, LocalCloudAdmin, LocalCloudError
from prefect_azmanagers.localcloud import server as localcloud_server

app = typer.Typer(no_args_is_help=True, help="The offline, ARM-compatible local cloud.")
console = Console()

MANIFEST_BLOCK = "localcloud"
# prefect-azure's Blob Storage blocks, saved under the manifest's name (keys of localcloud_blocks)
BLOB_CREDENTIALS = "blob-credentials"
BLOB_CONTAINER = "blob-container"
_NAMED_LIKE_THE_MANIFEST = (MANIFEST_BLOCK, BLOB_CREDENTIALS, BLOB_CONTAINER)
LOCALCLOUD_TEMPDISK = "mkdir -m 777 -p /mnt/scratch"  # a sandbox's /mnt is its own; / is not


class Network(str, Enum):
    """The local cloud's network modes (see localcloud/sandbox/modes.py)."""

    isolated = "isolated"
    loopback = "loopback"


StateDir = typer.Option(localcloud_server.DEFAULT_STATE_DIR, "--state-dir", help="The local cloud's state directory.")


def _admin(state_dir: Path) -> LocalCloudAdmin:
    try:
        return LocalCloudAdmin.from_state_dir(state_dir)
    except AdminError as exc:
        exit_with_error(str(exc))


def _without_secrets(info: dict[str, Any]) -> dict[str, Any]:
    """localcloud.json as it may be printed (its token and client secret are read from the file)."""
    return {k: v for k, v in info.items() if k not in localcloud_server.SECRET_FIELDS}


def localcloud_blocks(info: dict[str, Any]) -> dict[str, Any]:
    """The `localcloud` manifest and the example templates for a local cloud's localcloud.json
    (name -> block, not saved): its endpoint, CA, credentials, key pair, SSH user and port."""
    from prefect_azmanagers.blocks import AzureManifest
    from prefect_azmanagers.templates import build_nictemplate, build_sstemplate, build_vmtemplate

    sub, rg, location = info["subscription_id"], info["resource_group"], info["location"]
    manifest = AzureManifest(
        subscription_id=sub, resource_group=rg, location=location, ssh_user=info["ssh_user"],
        ssh_port=info.get("ssh_port", 22), ssh_private_key_file=info["ssh_private_key_file"],
        ssh_public_key_file=info["ssh_public_key_file"],
        arm_endpoint=info["arm_endpoint"], ca_bundle=info["ca_cert"], credential="static",
        static_token=info["static_token"], prefect_api_url_for_vms=info.get("prefect_api_url_for_vms"),
        # its service principal too: credential="client_secret" (or "default" with AZURE_* set) works
        tenant_id=info["tenant_id"], client_id=info["client_id"], client_secret=info["client_secret"],
        authority_host=info["authority_host"],
        known_hosts_file=info["known_hosts_file"], python=info["python"],
        blob_container=MANIFEST_BLOCK if info.get("blob_url") else None,
    )
    common = dict(subscription_id=sub, admin_username=info["ssh_user"], location=location, resource_group=rg,
                  image_gallery="localcloud-gallery", image_name="ubuntu", tempdisk=LOCALCLOUD_TEMPDISK)
    return {
        **_blob_blocks(info),
        MANIFEST_BLOCK: manifest,
        "localcloud-small": build_sstemplate("localcloud-small", vnet="localcloud-vnet", subnet="default",
                                             sku_name="Standard_D2s_v3", **common),
        "localcloud-vm": build_vmtemplate("localcloud-vm", vm_size="Standard_D2s_v3", nic_name="localcloud-nic",
                                          **common),
        "localcloud-nic": build_nictemplate("localcloud-nic", subscription_id=sub, resource_group_vnet=rg,
                                            vnet="localcloud-vnet", subnet="default", location=location,
                                            accelerated=False),
    }


def _blob_blocks(info: dict[str, Any]) -> dict[str, Any]:
    """prefect-azure's blocks for the local cloud's Blob Storage (Azurite), named like the
    manifest: `azure-blob-storage-container/localcloud` and its credentials; none without it."""
    if not info.get("blob_url"):
        return {}
    from prefect_azure import AzureBlobStorageContainer, AzureBlobStorageCredentials

    from prefect_azmanagers.localcloud.blob import BlobEndpoint

    endpoint = BlobEndpoint(info["blob_url"], info["blob_account"], info["blob_key"], info["blob_container"])
    credentials = AzureBlobStorageCredentials(connection_string=endpoint.connection_string)
    return {BLOB_CREDENTIALS: credentials,
            BLOB_CONTAINER: AzureBlobStorageContainer(container_name=endpoint.container, credentials=credentials)}


def save_blocks(info: dict[str, Any]) -> list[str]:
    """Save the `localcloud` manifest and the example templates in the current Prefect API."""
    from prefect_azmanagers.blocks import template_block_name

    blocks = localcloud_blocks(info)
    for name, block in blocks.items():
        block.save(MANIFEST_BLOCK if name in _NAMED_LIKE_THE_MANIFEST else template_block_name(name),
                   overwrite=True)
    return list(blocks)


@app.command()
def start(
    background: bool = typer.Option(False, "--background", help="Return once it runs (stop it with `stop`)."),
    state_dir: Path = StateDir,
    port: int = typer.Option(0, "--port", help="Loopback port of the ARM endpoint (0 = a free one)."),
    prefect_api_url: Optional[str] = typer.Option(
        None, "--prefect-api-url", help="A loopback Prefect API the VMs should reach (detached VMs)."),
    blob: Optional[bool] = typer.Option(
        None, "--blob/--no-blob",
        help="Blob Storage (Azurite) beside the ARM endpoint: --blob requires it, --no-blob skips "
             "it; by default it starts when installed."),
    network: Optional[Network] = typer.Option(
        None, "--network", case_sensitive=False,
        help="isolated: a network namespace per instance (root); loopback: 127.x.y.z addresses, "
             "no root needed. Default: config.json's `network`, else isolated as root."),
) -> None:
    """Start the local cloud and save the `localcloud` manifest and templates in Prefect.

    Example: prefect-azmanagers localcloud start --background --prefect-api-url http://127.0.0.1:4200/api
    """
    try:
        info = localcloud_server.start(state_dir, port=port, prefect_api_url=prefect_api_url, network=network.value if network else None,
                                       blob={True: "on", False: "off", None: "auto"}[blob])
    except LocalCloudError as exc:
        exit_with_error(str(exc))
    console.print_json(json.dumps(_without_secrets(info)))
    if info["mode"] == "loopback" and not info.get("prefect_api_url_for_vms"):
        console.print("[yellow]Loopback mode without --prefect-api-url[/yellow]: instances share this "
                      "machine's 127.0.0.1, so a task runner's SSH tunnel to a Prefect API on it cannot "
                      "listen there; restart with --prefect-api-url URL to run flows on the instances.")
    try:
        saved = save_blocks(info)
        templates = [name for name in saved if name not in _NAMED_LIKE_THE_MANIFEST]
        storage = (f"; Blob Storage (Azurite at {info['blob_url']}): azure-blob-storage-container/"
                   f"{MANIFEST_BLOCK}" if BLOB_CONTAINER in saved else "")
        console.print(f"Saved Prefect blocks: manifest '{MANIFEST_BLOCK}', templates {', '.join(templates)}{storage}.")
    except Exception as exc:  # the cloud is useful without the blocks: say so and keep it running
        console.print(f"[yellow]The local cloud runs, but its Prefect blocks were NOT saved[/yellow] "
                      f"({type(exc).__name__}: {exc}). Point PREFECT_API_URL at a running Prefect server "
                      "and run `prefect-azmanagers localcloud start` again after `stop`.")
    if info.get("blob_not_started"):
        console.print(f"[yellow]Blob Storage not started[/yellow]: {info['blob_not_started']}")
    if background:
        return
    stop_requested = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # before saying so: a Ctrl-C right after is a stop
        signal.signal(sig, lambda *_: stop_requested.append(True))
    console.print("Running in the foreground; Ctrl-C stops it and removes every instance.")
    try:
        while not stop_requested and localcloud_server.running_pid(Path(info["state_dir"])) == info["pid"]:
            time.sleep(0.5)
    finally:
        localcloud_server.stop(info["state_dir"])
        console.print("Stopped.")


@app.command()
def stop(state_dir: Path = StateDir) -> None:
    """Stop the local cloud: every instance, process, namespace and link it made is removed.

    Example: prefect-azmanagers localcloud stop --state-dir ~/.azmanagers/localcloud
    """
    try:
        stopped = localcloud_server.stop(state_dir)
    except LocalCloudError as exc:
        exit_with_error(str(exc))
    console.print("Stopped the local cloud." if stopped else "No local cloud was running; leftovers removed.")


@app.command()
def status(state_dir: Path = StateDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show mode, endpoint, scale sets and instances.

    Example: prefect-azmanagers localcloud status
    """
    info_path = Path(state_dir).expanduser() / localcloud_server.INFO_FILE
    if not info_path.exists():
        exit_with_error(f"no local cloud runs with state dir {state_dir}; start one with "
                        "`prefect-azmanagers localcloud start --background`")
    info = json.loads(info_path.read_text())
    doc = _admin_call(state_dir, lambda a: a.status())
    if as_json:
        console.print_json(json.dumps({"info": _without_secrets(info), **doc}))
        return
    mode = doc["host"]["mode"]
    console.print(f"[bold]Local cloud[/bold] pid {info['pid']}  mode [bold]{mode}[/bold] "
                  + ("(instances in their own network namespaces, SSH on port 22)" if mode == "isolated" else
                     f"(shared loopback: instances on 127.x.y.z addresses, SSH on port {info.get('ssh_port')}; "
                     "they can reach the host's 127.0.0.1, and the boot script runs without root)"))
    console.print(f"ARM endpoint {info['arm_endpoint']}  CA {info['ca_cert']}")
    console.print(f"subscription {info['subscription_id']}  resource group {info['resource_group']}  "
                  f"location {info['location']}  Prefect API for VMs {info.get('prefect_api_url_for_vms')}")
    sets = Table(title="Scale sets")
    for column in ("name", "sku", "capacity", "mode", "state"):
        sets.add_column(column)
    for ss in doc["scale_sets"]:
        sets.add_row(ss["name"], ss["sku"], str(ss["capacity"]), ss["orchestration_mode"], ss["provisioning_state"])
    console.print(sets)
    instances = Table(title="Instances")
    for column in ("name", "scale set", "private IP", "priority", "provisioning", "power"):
        instances.add_column(column)
    for inst in doc["instances"]:
        instances.add_row(inst["name"], inst["scale_set"] or "-", inst["private_ip"] or "-", inst["priority"],
                          inst["provisioning_state"], inst["power_state"])
    console.print(instances)


def _admin_call(state_dir: Path, action: Any) -> Any:
    with _admin(state_dir) as admin:
        try:
            return action(admin)
        except AdminError as exc:
            exit_with_error(str(exc))


@app.command()
def kill(instance: str, state_dir: Path = StateDir) -> None:
    """Kill an instance abruptly (VM name, vmId or computer name); ARM keeps it, stopped.

    Example: prefect-azmanagers localcloud kill mycluster_3
    """
    done = _admin_call(state_dir, lambda a: a.kill(instance))
    console.print(f"Killed {done['name']} ({done['vm_id']}).")


@app.command("drop-ssh")
def drop_ssh(instance: str, state_dir: Path = StateDir) -> None:
    """Cut an instance's live SSH connections; the instance keeps running.

    Example: prefect-azmanagers localcloud drop-ssh mycluster_3
    """
    done = _admin_call(state_dir, lambda a: a.drop_ssh(instance))
    console.print(f"Dropped the SSH connections of {done['name']}.")


@app.command()
def throttle(
    count: int, state_dir: Path = StateDir,
    retry_after: int = typer.Option(1, help="Retry-After seconds of each 429."),
    operation: Optional[str] = typer.Option(None, help="Only this operationId, e.g. VirtualMachineScaleSetVMs_List."),
) -> None:
    """Answer the next COUNT ARM requests with 429 + Retry-After (as CRP throttles).

    Example: prefect-azmanagers localcloud throttle 3 --retry-after 1
    """
    _admin_call(state_dir, lambda a: a.throttle(count, retry_after=retry_after, operation=operation))
    console.print(f"The next {count} request(s) get 429.")


@app.command("fail-next")
def fail_next(
    count: int = typer.Argument(1), state_dir: Path = StateDir,
    allocation_failed: bool = typer.Option(
        False, "--allocation-failed", help="Fail the next COUNT creations with AllocationFailed instead of 503."),
    operation: Optional[str] = typer.Option(None, help="Only this operationId (503 mode)."),
) -> None:
    """Fail the next COUNT ARM requests with 503, or the next COUNT creations with AllocationFailed.

    Example: prefect-azmanagers localcloud fail-next 1 --allocation-failed
    """
    if allocation_failed:
        _admin_call(state_dir, lambda a: a.fail_next_lro(count))
        console.print(f"The next {count} creation(s) fail with AllocationFailed.")
    else:
        _admin_call(state_dir, lambda a: a.fail_next(count, operation=operation))
        console.print(f"The next {count} request(s) get 503.")


@app.command()
def quota(name: str, limit: int, state_dir: Path = StateDir) -> None:
    """Set a quota (cores, lowPriorityCores, virtualMachines or a family like standardDSv3Family).

    Example: prefect-azmanagers localcloud quota standardDSv3Family 8
    """
    doc = _admin_call(state_dir, lambda a: a.set_quota(name, limit))
    console.print(f"{name}: limit {doc['quotas'][name]}, in use {doc['usage'].get(name, 0)}.")


@app.command("boot-delay")
def boot_delay(seconds: float, state_dir: Path = StateDir) -> None:
    """Make every following instance wait SECONDS before its SSH server starts.

    Example: prefect-azmanagers localcloud boot-delay 5
    """
    _admin_call(state_dir, lambda a: a.settings(boot_delay=seconds))
    console.print(f"Boot delay: {seconds} s.")


@app.command("boot-fail")
def boot_fail(count: int = typer.Argument(1), state_dir: Path = StateDir) -> None:
    """Make the next COUNT instance boots fail (instance and operation end Failed).

    Example: prefect-azmanagers localcloud boot-fail 2
    """
    _admin_call(state_dir, lambda a: a.boot_fail(count))
    console.print(f"The next {count} boot(s) fail.")


@app.command("eviction-notice")
def eviction_notice(seconds: float, state_dir: Path = StateDir) -> None:
    """Seconds between a Preempt scheduled event and the eviction (Azure: at least 30).

    Example: prefect-azmanagers localcloud eviction-notice 5
    """
    _admin_call(state_dir, lambda a: a.settings(eviction_notice=seconds))
    console.print(f"Eviction notice: {seconds} s.")


@app.command()
def counters(state_dir: Path = StateDir, reset: bool = typer.Option(False, "--reset")) -> None:
    """Show ARM requests by operationId and live instances (--reset zeroes the counters).

    Example: prefect-azmanagers localcloud counters
    """
    doc = _admin_call(state_dir, lambda a: a.counters())
    table = Table(title=f"ARM requests (live instances: {doc['live_instances']})")
    table.add_column("operation")
    table.add_column("requests", justify="right")
    for operation, n in sorted(doc["requests"].items()):
        table.add_row(operation, str(n))
    console.print(table)
    if reset:
        _admin_call(state_dir, lambda a: a.reset_counters())
