"""Detached VMs: `addproc` / `rmproc` / `DetachedVM`.

A detached VM is a standalone Azure VM (NIC + VM from templates, control plane `azure.vm`)
whose boot script starts a Prefect process worker for a work pool of its own, named after the
VM. The worker polls the Prefect API: nothing listens on the VM but SSH. The pool holds one
deployment, `azmanagers-detached/<vm name>`, of the generic flow `run_detached` (by module path,
the package being installed on every instance), through which `detachat` runs jobs there.

- No secret goes into customData. When the driver uses an API key (Prefect Cloud), addproc
  writes it over SSH (host key pinned per vmId) into `~/.azmanagers/prefect.env`, mode 0600,
  which the worker loop reads; on a self-hosted server or the local cloud no key is needed.
- The worker runs as the admin user in a restart loop (setsid, log in
  `~/.azmanagers/worker.log`), so it outlives a Prefect server restart or its own crash.
- The VM carries ownership tags (kind "detached"); `DetachedVM.from_name` finds it again from
  any process, and `rmproc` deletes the deployment, work pool, VM and NIC, each even if
  already gone.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
import uuid
from datetime import datetime, timezone
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncssh
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, WorkPoolFilter, WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL
from prefect.states import Crashed
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.workers.process import ProcessWorker

from prefect_azmanagers.azure import vm as azure_vm
from prefect_azmanagers.azure.bootscript import boot_script, encode_custom_data
from prefect_azmanagers.azure.clients import ArmClients
from prefect_azmanagers.azure.ownership import KIND_TAG, ownership_tags
from prefect_azmanagers.blocks import AzureManifest, load_manifest, load_nic_template, load_vm_template
from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
from prefect_azmanagers.cluster.transport import InstanceConnection
from prefect_azmanagers.customenv import boot_hooks
from prefect_azmanagers.detached.readiness import (
    API_ENV_FILE, WORKER_EXIT_LINE, WORKER_LOG, Readiness, wait_until_serving,
)
from prefect_azmanagers.detached.runtime import FLOW_NAME, PAYLOAD_DIR, run_detached
from prefect_azmanagers.detached.signing import (
    VM_KEY_FILE, JobKey, forget_driver_key, save_driver_key,
)
from prefect_azmanagers.network import is_loopback
from prefect_azmanagers.exceptions import (
    AzManagersError, BootFailed, ConfigurationError, PrefectAPIUnreachable, ResourceMissing,
)
from prefect_azmanagers.storage import result_storage

logger = logging.getLogger("prefect_azmanagers.detached")

DETACHED_KIND = "detached"
MANIFEST_TAG = "azmanagers-manifest"  # the manifest block's name, for rmproc from elsewhere
ADMIN_TAG = "azmanagers-admin"
CODE_DIR = ".azmanagers/code"
_FINAL_STATE_TYPES = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED,
                      StateType.CANCELLED}
# How often the VM's worker asks the API for work: the start latency of a job.
WORKER_QUERY_SECONDS = 2
WORKER_HEARTBEAT_SECONDS = 5
# Heartbeats a VM's worker may miss before ARM is asked whether the VM still runs.
WORKER_SILENT_HEARTBEATS = 3


@dataclass(frozen=True)
class DetachedVM:
    """A VM running a Prefect worker for its own work pool (see `addproc`)."""

    name: str
    private_ip: str
    vm_id: str
    resource_group: str
    admin_username: str
    manifest: str | None = None  # the manifest block's name, when it has one

    @property
    def work_pool(self) -> str:
        """The VM's work pool (named after the VM)."""
        return self.name

    @property
    def deployment(self) -> str:
        """`flow/deployment` name of the VM's generic deployment (for `prefect deployment run`)."""
        return f"{FLOW_NAME}/{self.name}"

    @classmethod
    def from_name(cls, name: str, *, manifest: str | AzureManifest = "default") -> DetachedVM:
        """Find a detached VM by name (from any process); ResourceMissing if it is gone."""
        return run_coro_as_sync(_from_name(name, manifest))


async def _from_name(name: str, manifest: str | AzureManifest) -> DetachedVM:
    manifest_name = manifest if isinstance(manifest, str) else None
    manifest = load_manifest(manifest)
    async with ArmClients(manifest) as clients:
        info = await azure_vm.get_vm(clients, manifest.resource_group, name)
    if info.tags.get(KIND_TAG) != DETACHED_KIND:
        raise ConfigurationError(
            f"VM {name!r} in resource group {manifest.resource_group!r} is not a detached VM "
            "(it was not made by addproc); use `prefect-azmanagers detached list` to see those.")
    return _detached_vm(info, manifest, manifest_name)


def _detached_vm(info: Any, manifest: AzureManifest, manifest_name: str | None) -> DetachedVM:
    return DetachedVM(name=info.name, private_ip=info.private_ip, vm_id=info.vm_id,
                      resource_group=info.resource_group,
                      admin_username=info.tags.get(ADMIN_TAG, manifest.ssh_user),
                      manifest=info.tags.get(MANIFEST_TAG) or manifest_name)


def api_url_for_vms(manifest: AzureManifest) -> str:
    """The Prefect API URL a VM of this manifest uses; PrefectAPIUnreachable if none works.

    The manifest's `prefect_api_url_for_vms` wins; otherwise the driver's PREFECT_API_URL, but a
    loopback URL only when the VMs share the driver's loopback (a local cloud in loopback mode,
    whose ARM endpoint is loopback too): an Azure VM cannot reach the laptop's 127.0.0.1.
    """
    if manifest.prefect_api_url_for_vms:
        return manifest.prefect_api_url_for_vms
    driver_url = PREFECT_API_URL.value()
    if not driver_url:
        raise PrefectAPIUnreachable(
            "No Prefect API is configured (PREFECT_API_URL is unset), so a detached VM's worker "
            "would have nothing to poll. Point PREFECT_API_URL at a Prefect server or Prefect "
            "Cloud, or set prefect_api_url_for_vms in the manifest.")
    if is_loopback(driver_url) and not is_loopback(manifest.arm_endpoint):
        raise PrefectAPIUnreachable(
            f"PREFECT_API_URL is {driver_url}, a loopback address of this machine, which Azure "
            "VMs cannot reach: the detached job would never start. Run the Prefect server where "
            "the VMs can reach it (e.g. `prefect server start --host 0.0.0.0` on a VM in the "
            "same VNet) and set its URL as prefect_api_url_for_vms in the manifest "
            "(`prefect-azmanagers manifest write --prefect-api-url-for-vms URL`), or use "
            "Prefect Cloud.")
    return driver_url


def _check_driver_api() -> None:
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
        if error is not None:
            raise PrefectAPIUnreachable(
                f"The Prefect API at {client.api_url} does not answer ({error}); start the "
                "server or fix PREFECT_API_URL before creating a detached VM.")


def code_dir(admin: str) -> str:
    """Where `addproc(code=...)` puts the user's code on the VM: the flow runs' working dir."""
    return f"/home/{admin}/{CODE_DIR}"


def worker_hook(*, admin: str, python: str, pool: str, api_url: str,
                default_storage_block: str | None = None) -> str:
    """Bash fragment for the boot script: the VM's Prefect worker, as `admin`, in a restart loop.

    Every value is shell-quoted. `~/.azmanagers/prefect.env` (written over SSH, 0600) is read
    at each (re)start, so an API key can arrive after boot without being in customData.
    `default_storage_block` (the manifest's blob container as a block slug, not a secret: its
    credential stays in the Prefect API) is the flow runs' default result storage.
    """
    home = f"/home/{admin}"
    state = f"{home}/.azmanagers"
    env = {"HOME": home, "USER": admin, "LOGNAME": admin, "PREFECT_API_URL": api_url,
           "PREFECT_HOME": f"{home}/.prefect",
           "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_SECONDS),
           "PREFECT_WORKER_HEARTBEAT_SECONDS": str(WORKER_HEARTBEAT_SECONDS)}
    if default_storage_block:
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = default_storage_block
    worker = shlex.join([python, "-m", "prefect", "worker", "start", "--pool", pool,
                         "--type", "process", "--name", pool])
    env_file = shlex.quote(f"{home}/{API_ENV_FILE}")
    loop = (f"cd; while true; do if [ -f {env_file} ]; then set -a; . {env_file}; set +a; fi; "
            f"{worker}; echo \"{WORKER_EXIT_LINE} $?; restarting in 5 s\"; sleep 5; done")
    log = shlex.quote(f"{home}/{WORKER_LOG}")
    start = shlex.join(["runuser", "-u", admin, "--", "env", *[f"{k}={v}" for k, v in env.items()],
                        "setsid", "bash", "-c", loop])
    return "\n".join([
        f"install -d -m 700 -o {shlex.quote(admin)} {shlex.quote(state)} "
        f"{shlex.quote(code_dir(admin))}",
        f"install -m 600 -o {shlex.quote(admin)} /dev/null {log}",
        f"nohup {start} >>{log} 2>&1 </dev/null &",
    ])


def _create_pool_and_deployment(pool: str, working_dir: str | None = None,
                                manifest_name: str | None = None) -> None:
    """The VM's process work pool and the generic deployment in it (idempotent).

    `working_dir` becomes the pool's default working directory of flow runs: the VM's code
    directory, so deployments with file entrypoints (prefect.yaml) find the shipped code.
    The deployment's tag `azmanagers-manifest:<name>` tells `vm_lost_reason` how to reach ARM.
    """
    template = ProcessWorker.get_default_base_job_template()
    if working_dir:
        template["variables"]["properties"]["working_dir"]["default"] = working_dir
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="process", base_job_template=template,
                description="Detached VM created by prefect-azmanagers addproc"))
        flow_id = client.create_flow_from_name(FLOW_NAME)
        client.create_deployment(
            flow_id, pool, work_pool_name=pool, entrypoint=f"{run_detached.__module__}.run_detached",
            pull_steps=[], parameter_openapi_schema=run_detached.parameters.model_dump(),
            tags=[f"{MANIFEST_TAG}:{manifest_name}"] if manifest_name else None,
            enforce_parameter_schema=False,
            description="Runs cloudpickled jobs sent by prefect_azmanagers.detachat on this VM.")


def _delete_pool_and_deployments(pool: str) -> None:
    """Delete the pool's deployments and the pool; already gone is fine.

    Flow runs of the pool that had not ended (their VM is gone) are marked Crashed, so that
    their jobs read as "failed" instead of running forever.
    """
    with get_client(sync_client=True) as client:
        unfinished = client.read_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[t for t in StateType if t not in _FINAL_STATE_TYPES]))))
        for flow_run in unfinished:
            client.set_flow_run_state(flow_run.id, Crashed(
                message=f"detached VM {pool} was deleted (rmproc) before the run ended"),
                force=True)
        for deployment in client.read_deployments(
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))):
            try:
                client.delete_deployment(deployment.id)
            except ObjectNotFound:
                pass
        try:
            client.delete_work_pool(pool)
        except ObjectNotFound:
            pass


def vm_lost_reason(pool: str, deployment_id: UUID | None) -> str | None:
    """Why the detached VM serving `pool` can no longer run its jobs, or None while it can.

    One API read while the VM's worker heartbeats. A worker silent for WORKER_SILENT_HEARTBEATS
    is not proof (a Prefect API outage silences it too), so ARM then says whether the VM still
    runs: deleted, stopped or deallocated (an eviction, a crash) means its jobs are lost.
    """
    with get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(pool)
        except ObjectNotFound:
            return f"the work pool of detached VM {pool} was deleted"
        now = datetime.now(timezone.utc)
        if any(worker.last_heartbeat_time is not None
               and (now - worker.last_heartbeat_time).total_seconds()
               <= WORKER_SILENT_HEARTBEATS * (worker.heartbeat_interval_seconds or WORKER_HEARTBEAT_SECONDS)
               for worker in workers):
            return None
        tags = client.read_deployment(deployment_id).tags if deployment_id else []
    manifest_name = next((tag.split(":", 1)[1] for tag in tags
                          if tag.startswith(f"{MANIFEST_TAG}:")), "default")
    try:
        manifest = load_manifest(manifest_name)
        state = run_coro_as_sync(_power_state(manifest, pool))
    except ResourceMissing:
        return f"detached VM {pool} no longer exists (deleted outside rmproc?)"
    except AzManagersError as exc:
        logger.warning("cannot ask ARM about detached VM %s, whose worker is silent: %s", pool, exc)
        return None
    if state in (None, "starting", "running"):
        return None
    return f"detached VM {pool} is {state} (evicted, crashed or stopped): its job was lost"


async def _power_state(manifest: AzureManifest, name: str) -> str | None:
    async with ArmClients(manifest) as clients:
        return await azure_vm.vm_power_state(clients, manifest.resource_group, name)


@asynccontextmanager
async def ssh_connection(vm: DetachedVM, manifest: AzureManifest) -> AsyncIterator[InstanceConnection]:
    """SSH to the VM as the manifest's user; its host key is pinned per vmId."""
    connection = await InstanceConnection.open(
        vm.private_ip, port=manifest.ssh_port, username=manifest.ssh_user,
        client_key=asyncssh.import_private_key(manifest.read_private_key()), vm_id=vm.vm_id,
        host_keys=PinnedHostKeys(manifest.known_hosts_path()))
    try:
        yield connection
    finally:
        connection.close()
        await connection.wait_closed()


async def _write_private_file(sftp: asyncssh.SFTPClient, relative_path: str, data: bytes) -> None:
    """Write `data` to ~/relative_path on the VM over SFTP, mode 0600 from creation."""
    directory = relative_path.rsplit("/", 1)[0]
    await sftp.makedirs(directory, exist_ok=True)
    async with sftp.open(relative_path, "wb", asyncssh.SFTPAttrs(permissions=0o600)) as remote:
        await remote.write(data)


def upload_payload(vm: DetachedVM, payload: bytes, *, manifest: str | AzureManifest | None = None
                   ) -> str:
    """Put a large job payload on the VM over SFTP; returns its file name for `run_detached`."""
    manifest = load_manifest(manifest or vm.manifest or "default")
    name = f"{uuid.uuid4().hex}.pkl"

    async def upload() -> None:
        async with ssh_connection(vm, manifest) as connection:
            async with connection.ssh.start_sftp_client() as sftp:
                await _write_private_file(sftp, f"{PAYLOAD_DIR.relative_to('~')}/{name}", payload)

    run_coro_as_sync(upload())
    return name


def _code_path(code: str | os.PathLike[str]) -> Path:
    path = Path(code).resolve()
    if not path.is_dir():
        raise ConfigurationError(f"code={str(path)!r} is not a directory; pass the directory "
                                 "holding the flows to run on the VM, e.g. code='flows'.")
    return path


async def _ship(sftp: asyncssh.SFTPClient, key: JobKey, code: Path | None) -> None:
    """The VM's job key, the driver's API key (if any) and the user's code, over SFTP."""
    await _write_private_file(sftp, VM_KEY_FILE, key.to_json())
    if api_key := PREFECT_API_KEY.value():
        await _write_private_file(sftp, API_ENV_FILE,
                                  f"PREFECT_API_KEY={shlex.quote(api_key)}\n".encode())
    if code is not None:
        await sftp.put(str(code), f"{CODE_DIR}/{code.name}", recurse=True)


async def _prepare(vm: DetachedVM, manifest: AzureManifest, key: JobKey, code: Path | None,
                   readiness: Readiness) -> None:
    """Over one pinned SSH connection: ship the VM's files, then watch its worker come up."""
    try:
        async with ssh_connection(vm, manifest) as connection:
            async with connection.ssh.start_sftp_client() as sftp:
                await _ship(sftp, key, code)
            async with get_client() as client:
                async def worker_online() -> bool:
                    workers = await client.read_workers_for_work_pool(vm.work_pool)
                    return any(worker.status == "ONLINE" for worker in workers)

                await wait_until_serving(connection.ssh, readiness, admin=vm.admin_username,
                                         probe_python=manifest.python, worker_online=worker_online)
    except (OSError, asyncssh.Error) as exc:
        raise BootFailed(
            f"SSH to detached VM {vm.name} at {vm.private_ip}:{manifest.ssh_port} as "
            f"{manifest.ssh_user} failed ({type(exc).__name__}: {exc}): this machine must reach "
            "the VM's private address (VNet, VPN or peering), and the VM must accept the "
            "manifest's SSH key") from exc


async def _create(manifest: AzureManifest, manifest_name: str | None, vm_template: Any,
                  nic_template: Any, name: str, custom_data: str) -> DetachedVM:
    async with ArmClients(manifest, subscription_id=vm_template.subscription_id) as clients:
        tags = {**ownership_tags(name, kind=DETACHED_KIND),
                ADMIN_TAG: vm_template.value["properties"]["osProfile"]["adminUsername"]}
        if manifest_name:
            tags[MANIFEST_TAG] = manifest_name
        created = await azure_vm.create_vm(clients, manifest, vm_template, nic_template, name,
                                           custom_data=custom_data, tags=tags)
        # Read back: the address the VM's NIC holds once attached is the one SSH must use
        # (the local cloud assigns it at VM creation, not in the NIC creation reply).
        info = await azure_vm.get_vm(clients, created.resource_group, name)
    return _detached_vm(info, manifest, manifest_name)


async def _delete(manifest: AzureManifest, resource_group: str, name: str) -> None:
    async with ArmClients(manifest) as clients:
        await azure_vm.delete_vm(clients, resource_group, name)


def addproc(vm_template: str | Any, nic_template: str | Any | None = None, *,
            name: str | None = None, basename: str = "azm", manifest: str | AzureManifest = "default",
            customenv: bool = False, code: str | os.PathLike[str] | None = None,
            worker_timeout: float = 600.0) -> DetachedVM:
    """Create a detached VM whose Prefect worker serves its own work pool; returns when polling.

    Checks first that the Prefect API is usable by the VM (PrefectAPIUnreachable otherwise),
    then creates the work pool and deployment, the NIC and VM, ships the VM's job key (see
    `signing`) over SFTP, and waits (up to `worker_timeout` s) for the worker's heartbeat,
    watching the VM meanwhile (`readiness`): a failed boot, a worker that keeps exiting or a
    VM that cannot reach the API ends the wait at once with an error naming the fix. On any
    failure, or Ctrl-C, everything it created is deleted. `customenv=True` builds the driver's environment on the VM at boot
    (prefect_azmanagers.customenv) and runs the worker and its jobs with it. `code`, a local
    directory (e.g. "flows"), is copied to the VM's code directory, the working directory of
    its flow runs, for deployments of files (prefect.yaml).
    """
    manifest_name = manifest if isinstance(manifest, str) else None
    manifest = load_manifest(manifest)
    vm_template = load_vm_template(vm_template)
    nic_template = load_nic_template(nic_template) if nic_template is not None else None
    api_url = api_url_for_vms(manifest)
    url_source = ("the manifest's prefect_api_url_for_vms" if manifest.prefect_api_url_for_vms
                  else "the driver's PREFECT_API_URL (the manifest has no prefect_api_url_for_vms)")
    _check_driver_api()
    name = name or azure_vm.vm_name(basename)
    admin = vm_template.value["properties"]["osProfile"]["adminUsername"]
    # seam owned by customenv: the venv is built before the worker starts
    hooks, python = boot_hooks(customenv, admin_username=admin, python=manifest.python)
    script = boot_script(admin_username=admin, tempdisk=vm_template.tempdisk, hooks=[
        *hooks, worker_hook(admin=admin, python=python, pool=name, api_url=api_url,
                            default_storage_block=result_storage(manifest))])
    custom_data = encode_custom_data(script)
    code = _code_path(code) if code is not None else None
    vm: DetachedVM | None = None
    try:
        _create_pool_and_deployment(name, code_dir(admin), manifest_name)
        vm = run_coro_as_sync(_create(manifest, manifest_name, vm_template, nic_template, name,
                                      custom_data))
        key = JobKey.new(vm.name, vm.vm_id)
        save_driver_key(key)
        readiness = Readiness(vm=name, api_url=api_url, url_source=url_source, python=python,
                              local_cloud=is_loopback(manifest.arm_endpoint),
                              timeout=worker_timeout, now=time.monotonic())
        run_coro_as_sync(_prepare(vm, manifest, key, code, readiness))
        return vm
    except BaseException:
        try:
            _remove(manifest, vm_template.resource_group, name)
            if vm is not None:
                forget_driver_key(vm.name, vm.vm_id)
                PinnedHostKeys(manifest.known_hosts_path()).forget({vm.vm_id})
        except Exception as cleanup_error:  # keep the original error; say what is left
            logger.error("Could not remove detached VM %s after a failure: %s. Remove it with "
                         "`prefect-azmanagers detached rm %s`.", name, cleanup_error, name)
        raise


def _remove(manifest: AzureManifest, resource_group: str, name: str) -> None:
    # The VM first: its worker would re-create a deleted work pool at its next heartbeat.
    run_coro_as_sync(_delete(manifest, resource_group, name))   # a VM already gone is fine
    _delete_pool_and_deployments(name)


def rmproc(vm: DetachedVM | str, *, manifest: str | AzureManifest | None = None) -> None:
    """Delete a detached VM: its VM, NIC, deployments and work pool (each even if already gone).

    Deleting the VM stops its worker and any job still running there; such a job's flow run is
    marked Crashed (its status reads "failed"). A VM named by a string must be a detached VM
    (ConfigurationError for any other VM of that name, which is left alone).
    """
    manifest = load_manifest(manifest or (vm.manifest if isinstance(vm, DetachedVM) else None)
                             or "default")
    if isinstance(vm, str):
        try:
            vm = DetachedVM.from_name(vm, manifest=manifest)
        except ResourceMissing:  # the VM is gone already: its pool and deployment may not be
            _delete_pool_and_deployments(vm)
            return
    _remove(manifest, vm.resource_group, vm.name)
    PinnedHostKeys(manifest.known_hosts_path()).forget({vm.vm_id})


def list_detached_vms(*, manifest: str | AzureManifest = "default") -> list[DetachedVM]:
    """The detached VMs (made by addproc) in the manifest's resource group."""
    manifest_name = manifest if isinstance(manifest, str) else None
    manifest = load_manifest(manifest)

    async def listing() -> list[DetachedVM]:
        async with ArmClients(manifest) as clients:
            infos = await azure_vm.list_vms(clients, manifest.resource_group,
                                            tag_filter={KIND_TAG: DETACHED_KIND})
        return [_detached_vm(info, manifest, manifest_name) for info in infos]

    return run_coro_as_sync(listing())
