"""One flow run's VM for the azure-vm worker: create, ship, stream, follow, delete; adoption.

The VM = NIC + VM from the job's templates (control plane `azure.vm`), tagged with the pool,
the flow run's id and the worker's name. Its boot script starts, in the background as the
admin user, a loop that waits for `~/.azmanagers/run.env` (the run's environment, which the
worker writes over SSH, 0600, renamed into place: customData holds no secret), sources and
deletes it, and runs `python -m prefect flow-run execute <id>` (log `~/.azmanagers/engine.log`,
ending with the line `prefect-azmanagers: engine exited with status N`). The engine reaches
the Prefect API at `api_url_for_vms(manifest)`, as detached VMs do.

The worker streams, over the same SSH connection, the VM's boot log into the run's log and
the engine's output into its own; it reads the run's state every STATE_POLL_SECONDS and the
VM's power state from ARM every ARM_POLL_SECONDS. A Prefect API that does not answer (no
connection, 5xx, 429) is retried with backoff for API_RETRY_SECONDS; then the worker stops
following, leaving the VM running for adoption once the API answers again (deleting it would
leave its run Running with nothing under it). It ends the run itself where the VM cannot:
Crashed when the VM is gone, stopped or deallocated, when the boot script failed, when the run
did not start within boot_timeout, or when the engine exited without a final state; Cancelled
(VM deleted) when a Cancelling run's engine did not end it within CANCEL_GRACE_SECONDS. Once
the run is final the VM is deleted (after keep_on_failure seconds if it did not complete), on
every path, once the engine exited (at most ENGINE_DRAIN_SECONDS later: it sends the flow's
last log lines as it exits, after its final state); the one exception is a worker that stops
while its runs go on: their VMs stay, and `adopt` in the next worker of the pool follows them
(or deletes those whose run has ended).
"""

from __future__ import annotations

import shlex
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional
from uuid import UUID

import anyio
import anyio.abc
import anyio.to_thread
import asyncssh
import httpx
from prefect.client.schemas.filters import (
    FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, WorkPoolFilter, WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.exceptions import InfrastructureNotFound, ObjectNotFound
from prefect.states import Cancelled, Crashed

from prefect_azmanagers.azure import vm as azure_vm
from prefect_azmanagers.azure.bootscript import _env_lines, boot_script, encode_custom_data
from prefect_azmanagers.azure.clients import ArmClients
from prefect_azmanagers.azure.ownership import KIND_TAG, ownership_tags
from prefect_azmanagers.blocks import AzureManifest, aload_manifest, aload_nic_template, aload_vm_template
from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
from prefect_azmanagers.customenv import boot_hooks
from prefect_azmanagers.detached.vm import ADMIN_TAG, MANIFEST_TAG, api_url_for_vms, ssh_connection
from prefect_azmanagers.exceptions import (
    AzManagersError, ConfigurationError, ManifestNotFound, PrefectAPIUnreachable, ResourceMissing,
)
from prefect_azmanagers.storage import result_storage
from prefect_azmanagers.workers.azure_vm import AzureVMJobConfiguration, AzureVMWorker

KIND = "azure-vm"                      # ownership kind of the VMs the worker makes
POOL_TAG = "azmanagers-work-pool"
FLOW_RUN_TAG = "azmanagers-flow-run"
WORKER_TAG = "azmanagers-worker"
STATE_DIR = ".azmanagers"              # in the admin user's home on the VM
RUN_ENV_FILE = f"{STATE_DIR}/run.env"
ENGINE_LOG = f"{STATE_DIR}/engine.log"
BOOT_LOG = "/var/log/cloud-init-output.log"
ENGINE_EXIT_MARK = "prefect-azmanagers: engine exited with status "
BOOT_FAILED_MARK = "prefect-azmanagers boot: failed"
DEFAULT_COMMAND = "prefect flow-run execute"  # what Prefect puts in `command` when none is set
_FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
STATE_POLL_SECONDS = 2.0
ARM_POLL_SECONDS = 10.0
CANCEL_GRACE_SECONDS = 30.0       # for the VM's engine to end a Cancelling run itself
ENGINE_EXIT_GRACE_SECONDS = 20.0  # for a final state to arrive after the engine exited
ENGINE_DRAIN_SECONDS = 30.0       # for the engine to exit after the final state (its last logs)
OWNER_SILENT_HEARTBEATS = 3       # a worker silent this long no longer follows its VMs
API_RETRY_SECONDS = 300.0         # how long a follower retries a Prefect API that does not answer
API_BACKOFF_FIRST, API_BACKOFF_MAX = 1.0, 30.0  # seconds between those retries (doubling)
# The worker machine's own settings, which must not reach the VM.
_WORKER_LOCAL = {"PREFECT_HOME", "PREFECT_PROFILES_PATH", "PREFECT_API_URL", "PREFECT_UI_URL"}


def vm_environment(env: dict[str, Any], *, api_url: str, admin: str,
                   default_storage_block: str | None = None) -> dict[str, str]:
    """The run's environment on the VM: the job's env without the worker machine's paths,
    server settings and API URL, plus the API URL VMs use and the admin user's home.

    `default_storage_block` (the manifest's blob container as a block slug) becomes the flow
    run's default result storage, as on detached VMs, unless the job's env names one."""
    out = {k: str(v) for k, v in env.items()
           if v is not None and k not in _WORKER_LOCAL and not k.startswith("PREFECT_SERVER_")}
    home = f"/home/{admin}"
    out.update(PREFECT_API_URL=api_url, HOME=home, USER=admin, LOGNAME=admin,
               PREFECT_HOME=f"{home}/.prefect")
    if default_storage_block:
        out.setdefault("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK", default_storage_block)
    return out


def engine_command(python: str, flow_run_id: UUID, command: str | None) -> str:
    """`python -m prefect flow-run execute <id>`, or the job's own `command`."""
    if command and command.strip() != DEFAULT_COMMAND:
        return command
    return shlex.join([python, "-m", "prefect", "flow-run", "execute", str(flow_run_id)])


def engine_hook(*, admin: str, engine: str, flow_run_id: UUID, wait_seconds: float) -> str:
    """Bash fragment for the boot script: in the background, as `admin`, wait for the run's
    environment file, source and delete it, run `engine` (output in ENGINE_LOG)."""
    home = f"/home/{admin}"
    env_file = shlex.quote(f"{home}/{RUN_ENV_FILE}")
    limit = int(wait_seconds)
    loop = "; ".join([
        "cd", "t=0",
        f"while [ ! -f {env_file} ]; do if [ $t -ge {limit} ]; then "
        f"echo 'prefect-azmanagers: the run environment did not arrive within {limit} s'; "
        f"echo '{ENGINE_EXIT_MARK}125'; exit 125; fi; sleep 1; t=$((t+1)); done",
        f"set -a; . {env_file}; set +a; rm -f {env_file}",
        f"echo 'prefect-azmanagers: starting the engine for flow run {flow_run_id}'",
        f"{engine}; rc=$?", f"echo \"{ENGINE_EXIT_MARK}$rc\"",
    ])
    log = shlex.quote(f"{home}/{ENGINE_LOG}")
    start = shlex.join(["runuser", "-u", admin, "--", "env", f"HOME={home}", f"USER={admin}",
                        f"LOGNAME={admin}", "setsid", "bash", "-c", loop])
    return "\n".join([
        f"install -d -m 700 -o {shlex.quote(admin)} {shlex.quote(f'{home}/{STATE_DIR}')}",
        f"install -m 600 -o {shlex.quote(admin)} /dev/null {log}",
        f"nohup {start} >>{log} 2>&1 </dev/null &",
    ])


def parse_infrastructure_pid(pid: str) -> tuple[str, str]:
    """(resource group, VM name) from the `resource_group/name` the worker gives a run."""
    group, _, name = (pid or "").partition("/")
    if not group or not name or "/" in name:
        raise InfrastructureNotFound(f"{pid!r} is not an azure-vm infrastructure id (group/name)")
    return group, name


def _transient(exc: BaseException) -> bool:
    """A Prefect API error worth retrying: no answer, or a server-side (5xx) or rate (429) one."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, httpx.TransportError)


@dataclass
class VMRun:
    """One flow run on its VM, as the worker follows it."""

    worker: AzureVMWorker
    flow_run: FlowRun
    config: AzureVMJobConfiguration
    manifest: AzureManifest
    vm: azure_vm.VMInfo
    admin: str
    created: float                    # monotonic time of the VM's creation (or adoption)
    boot_failure: str | None = None   # the boot script's failure line, once seen
    engine_exit: int | None = None    # the engine's exit status, once seen
    engine_exit_at: float = 0.0

    @property
    def pid(self) -> str:
        return f"{self.vm.resource_group}/{self.vm.name}"

    @property
    def run_logger(self) -> Any:
        return self.worker.get_flow_run_logger(self.flow_run)

    async def connect(self, stack: AsyncExitStack) -> Any:
        """SSH to the VM (host key pinned per vmId), retrying while it boots; `stack` closes it."""
        deadline = self.created + self.config.boot_timeout
        while True:
            try:
                return await stack.enter_async_context(ssh_connection(self.vm, self.manifest))
            except (OSError, asyncssh.Error) as exc:
                if time.monotonic() >= deadline:
                    raise AzManagersError(f"VM {self.vm.name} did not accept SSH within "
                                          f"{self.config.boot_timeout:.0f} s (boot_timeout): "
                                          f"{exc}") from exc
                await anyio.sleep(2)

    async def stream(self, connection: Any, *, boot: bool) -> None:
        """Forward the boot log to the run's log and the engine's output to the worker's log;
        note the boot-failure and engine-exit lines. Returns when the connection ends."""
        files = ([BOOT_LOG] if boot else []) + [f"/home/{self.admin}/{ENGINE_LOG}"]
        command = f"tail -n +1 -F {' '.join(shlex.quote(f) for f in files)} 2>/dev/null"
        source, run_logger = files[0], self.run_logger
        try:
            async with connection.ssh.create_process(command) as process:
                async for line in process.stdout:
                    line = line.rstrip("\n")
                    if line.startswith("==> ") and line.endswith(" <=="):
                        source = line[4:-4]
                    elif not line:
                        continue
                    elif source == BOOT_LOG:
                        run_logger.info("[%s boot] %s", self.vm.name, line)
                        if line.startswith(BOOT_FAILED_MARK):
                            self.boot_failure = line
                    else:
                        self.worker.log.info("[%s] %s", self.vm.name, line)
                        if line.startswith(ENGINE_EXIT_MARK):
                            status = line[len(ENGINE_EXIT_MARK):].strip()
                            self.engine_exit = int(status) if status.lstrip("-").isdigit() else -1
                            self.engine_exit_at = time.monotonic()
        except (OSError, asyncssh.Error) as exc:
            self.worker.log.debug("output stream of VM %s ended: %s", self.vm.name, exc)

    async def follow(self, clients: ArmClients) -> StateType:
        """Poll the run's state until it is final, ending it where the VM cannot, then delete
        the VM; returns the final state's type."""
        next_arm = time.monotonic() + ARM_POLL_SECONDS
        cancelling_since: float | None = None
        while True:
            flow_run = await self.read_flow_run()
            state = flow_run.state
            kind = state.type if state else StateType.PENDING
            now = time.monotonic()
            if kind in _FINAL:
                await self.engine_exited()
                self.run_logger.info("Flow run is %s; deleting VM %s", state.name, self.vm.name)
                await self.delete(clients, keep=kind != StateType.COMPLETED)
                return kind
            if kind == StateType.SCHEDULED and self.engine_exit is not None:
                # the engine gave the run back (SIGTERM with intent "reschedule"): a new VM
                # serves its next attempt
                self.run_logger.info("Flow run rescheduled; deleting VM %s", self.vm.name)
                await self.delete(clients, keep=False)
                return kind
            reason = None
            if kind == StateType.CANCELLING:
                cancelling_since = cancelling_since or now
                if now - cancelling_since >= CANCEL_GRACE_SECONDS:
                    return await self.end(clients, f"VM {self.vm.name} deleted: its engine did "
                                          f"not end the run within {CANCEL_GRACE_SECONDS:.0f} s")
            elif self.boot_failure:
                reason = f"the boot script of VM {self.vm.name} failed ({self.boot_failure})"
            elif flow_run.start_time is None and now - self.created > self.config.boot_timeout:
                reason = (f"the flow run did not start on VM {self.vm.name} within "
                          f"{self.config.boot_timeout:.0f} s (boot_timeout)")
            elif (self.engine_exit is not None
                  and now - self.engine_exit_at > ENGINE_EXIT_GRACE_SECONDS):
                reason = (f"the engine on VM {self.vm.name} exited with status "
                          f"{self.engine_exit} without reporting a final state")
            if reason is None and now >= next_arm:
                next_arm = now + ARM_POLL_SECONDS
                reason = await self.lost_reason(clients)
            if reason is not None:
                return await self.end(clients, reason)
            await anyio.sleep(STATE_POLL_SECONDS)

    async def engine_exited(self) -> None:
        """After the run's final state, wait (at most ENGINE_DRAIN_SECONDS) for its engine to
        exit: the engine sends its last log lines and events as it exits, and a VM deleted
        sooner loses them (seen: the flow's own lines missing from the run's logs)."""
        deadline = time.monotonic() + ENGINE_DRAIN_SECONDS
        while self.engine_exit is None and time.monotonic() < deadline:
            await anyio.sleep(min(STATE_POLL_SECONDS, 0.5))

    async def read_flow_run(self) -> FlowRun:
        """The run as the API has it now, retried while the API does not answer (see `api`)."""
        return await self.api(lambda: self.worker.client.read_flow_run(self.flow_run.id),
                              "read the flow run's state")

    async def api(self, call: Any, what: str) -> Any:
        """`await call()`, retried with doubling backoff while the Prefect API does not answer
        (no connection, 5xx, 429), for API_RETRY_SECONDS; then PrefectAPIUnreachable, with
        the VM left running for adoption. Other errors are raised at once."""
        delay, deadline = API_BACKOFF_FIRST, None
        while True:
            try:
                return await call()
            except Exception as exc:
                if not _transient(exc):
                    raise
                now = time.monotonic()
                deadline = deadline or now + API_RETRY_SECONDS
                if now >= deadline:
                    raise PrefectAPIUnreachable(
                        f"Stopped following VM {self.vm.name} (flow run {self.flow_run.id}): "
                        f"the Prefect API did not answer for {API_RETRY_SECONDS:.0f} s when the "
                        f"worker tried to {what} (last error: {exc!r}). The VM keeps running; "
                        f"a worker of pool {self.worker.work_pool.name} adopts it once the API "
                        "answers and deletes it when the run has ended.") from exc
                self.worker.log.warning("cannot %s for VM %s (%r); retrying in %.0f s", what,
                                        self.vm.name, exc, delay)
                await anyio.sleep(min(delay, deadline - now))
                delay = min(2 * delay, API_BACKOFF_MAX)

    async def lost_reason(self, clients: ArmClients) -> str | None:
        """Why ARM says the VM can no longer run the flow, or None while it can."""
        try:
            power = await azure_vm.vm_power_state(clients, self.vm.resource_group, self.vm.name)
        except ResourceMissing:
            why = "evicted or deleted" if self.config.spot else "deleted outside the worker"
            return f"VM {self.vm.name} no longer exists ({why})"
        except AzManagersError as exc:  # ARM unreachable is no proof of a lost VM
            self.worker.log.warning("cannot read VM %s from ARM: %s", self.vm.name, exc)
            return None
        if power in (None, "starting", "running"):
            return None
        return f"VM {self.vm.name} is {power} (evicted, crashed or stopped): the flow run was lost"

    async def end(self, clients: ArmClients, reason: str) -> StateType:
        """End a run its VM cannot finish: Crashed with the reason (Cancelled when it was
        being cancelled; a final state that arrived meanwhile stands), then delete the VM."""
        state = (await self.read_flow_run()).state
        if state is not None and state.type in _FINAL:
            await self.delete(clients, keep=state.type != StateType.COMPLETED)
            return state.type
        if state is not None and state.type == StateType.CANCELLING:
            final = Cancelled(message=f"Cancelled: {reason}")
        else:
            final = Crashed(message=f"Flow run crashed: {reason}")
        self.run_logger.error("%s: %s", final.name, reason)
        await self.set_state(final)
        await self.delete(clients, keep=final.type == StateType.CRASHED)
        return final.type

    async def set_state(self, state: State) -> None:
        """Force the run's state (retried as `api` retries)."""
        await self.api(lambda: self.worker.client.set_flow_run_state(self.flow_run.id, state,
                                                                     force=True),
                       f"set the flow run {state.name}")

    async def delete(self, clients: ArmClients, *, keep: bool) -> None:
        """Delete VM + NIC (idempotent), after keep_on_failure seconds if `keep`."""
        if keep and self.config.keep_on_failure > 0:
            self.run_logger.info("Keeping VM %s (%s) for %.0f s (keep_on_failure)",
                                 self.vm.name, self.vm.private_ip, self.config.keep_on_failure)
            await anyio.sleep(self.config.keep_on_failure)
        await _delete_vm(clients, self.manifest, self.vm)


async def _delete_vm(clients: ArmClients, manifest: AzureManifest, vm: azure_vm.VMInfo) -> None:
    await azure_vm.delete_vm(clients, vm.resource_group, vm.name, nic_name=vm.nic_name or None)
    PinnedHostKeys(manifest.known_hosts_path()).forget({vm.vm_id})


async def run_flow_run(worker: AzureVMWorker, flow_run: FlowRun, config: AzureVMJobConfiguration,
                       task_status: Optional[anyio.abc.TaskStatus[str]]) -> str:
    """The whole life of one flow run's VM; returns the VM (`group/name`)."""
    manifest = await aload_manifest(config.manifest)
    if not config.vm_template:
        raise ConfigurationError(
            "No VM template: set the job variable vm_template to a VMTemplate block's name (in "
            "the work pool, the deployment's job_variables, or `prefect deployment run ... "
            "--job-variable vm_template=NAME`).")
    vm_template = await aload_vm_template(config.vm_template)
    nic_template = await aload_nic_template(config.nic_template) if config.nic_template else None
    admin = manifest.ssh_user or vm_template.value["properties"]["osProfile"]["adminUsername"]
    env = vm_environment(config.env, api_url=api_url_for_vms(manifest), admin=admin,
                         default_storage_block=await anyio.to_thread.run_sync(result_storage,
                                                                              manifest))
    env_file = "".join(f"{line}\n" for line in _env_lines(env)).encode()  # bad names fail here
    hooks, python = boot_hooks(config.customenv, admin_username=admin, python=manifest.python)
    hooks.append(engine_hook(admin=admin, engine=engine_command(python, flow_run.id, config.command),
                             flow_run_id=flow_run.id, wait_seconds=config.boot_timeout))
    custom_data = encode_custom_data(boot_script(admin_username=admin,
                                                 tempdisk=vm_template.tempdisk, hooks=hooks))
    tags = {**ownership_tags(str(flow_run.id), kind=KIND), POOL_TAG: worker.work_pool.name,
            FLOW_RUN_TAG: str(flow_run.id), WORKER_TAG: worker.name, ADMIN_TAG: admin,
            MANIFEST_TAG: config.manifest}
    name = azure_vm.vm_name(config.basename)
    group = vm_template.resource_group or manifest.resource_group
    run_logger = worker.get_flow_run_logger(flow_run)
    started = time.monotonic()
    async with ArmClients(manifest, subscription_id=vm_template.subscription_id) as clients:
        run_logger.info("Creating VM %s for the flow run", name)
        await azure_vm.create_vm(
            clients, manifest, vm_template, nic_template, name, custom_data=custom_data, tags=tags,
            os_disk_size=config.os_disk_size, image_name=config.image_name,
            image_version=config.image_version, spot=config.spot, max_price=config.max_price)
        try:
            run = VMRun(worker, flow_run, config, manifest, await azure_vm.get_vm(clients, group, name),
                        admin, time.monotonic())
        except BaseException:
            with anyio.CancelScope(shield=True):
                await azure_vm.delete_vm(clients, group, name)
            raise
        run_logger.info("VM %s (%s) provisioned in %.1f s", name, run.vm.private_ip,
                        run.created - started)
        await _run_on_vm(clients, run, env_file, task_status)
    return run.pid


async def _run_on_vm(clients: ArmClients, run: VMRun, env_file: bytes,
                     task_status: Optional[anyio.abc.TaskStatus[str]]) -> StateType:
    shipped, gave_up = False, None
    try:
        async with AsyncExitStack() as stack, anyio.create_task_group() as streams:
            connection = await run.connect(stack)
            streams.start_soon(lambda: run.stream(connection, boot=True))
            await _write_private_file(connection, RUN_ENV_FILE, env_file)
            shipped = True
            if task_status is not None:
                task_status.started(run.pid)
            try:
                state = await run.follow(clients)
            except PrefectAPIUnreachable as exc:  # caught here: the task group would wrap it
                gave_up = exc
            streams.cancel_scope.cancel()
        if gave_up is not None:
            raise gave_up
        return state
    except PrefectAPIUnreachable as exc:  # the VM stays, for adoption (see `VMRun.api`)
        run.worker.log.error("%s", exc)
        raise
    except anyio.get_cancelled_exc_class():
        if shipped:  # the worker stops while the run goes on: the next worker adopts the VM
            run.run_logger.warning(
                "Worker stopping: VM %s keeps running the flow run; the next worker of pool %s "
                "follows it and deletes it when the run ends", run.vm.name, run.worker.work_pool.name)
            raise
        with anyio.CancelScope(shield=True):
            await run.delete(clients, keep=False)
        raise
    except BaseException:
        with anyio.CancelScope(shield=True):
            await run.delete(clients, keep=False)
        raise


async def _write_private_file(connection: Any, relative_path: str, data: bytes) -> None:
    """Write ~/relative_path on the VM over SFTP, mode 0600 from creation, renamed into place
    so that the boot script never reads it half-written."""
    async with connection.ssh.start_sftp_client() as sftp:
        await sftp.makedirs(relative_path.rsplit("/", 1)[0], exist_ok=True)
        async with sftp.open(f"{relative_path}.tmp", "wb",
                             asyncssh.SFTPAttrs(permissions=0o600)) as remote:
            await remote.write(data)
        await sftp.posix_rename(f"{relative_path}.tmp", relative_path)


async def kill_vm(infrastructure_pid: str, config: AzureVMJobConfiguration) -> None:
    """Delete a run's VM and NIC; InfrastructureNotFound if the VM is gone already."""
    group, name = parse_infrastructure_pid(infrastructure_pid)
    manifest = await aload_manifest(config.manifest)
    async with ArmClients(manifest) as clients:
        try:
            vm = await azure_vm.get_vm(clients, group, name)
        except ResourceMissing:
            raise InfrastructureNotFound(f"VM {name} in {group} no longer exists") from None
        await _delete_vm(clients, manifest, vm)


async def adopt(worker: AzureVMWorker, task_group: anyio.abc.TaskGroup) -> list[str]:
    """VMs of the worker's pool that no live worker follows: start following (in
    `task_group`) those whose run goes on, delete the others; returns their names.

    The VMs are listed by tag in the resource group of every manifest that the pool's default,
    a deployment of the pool or an unfollowed unfinished run of the pool names.
    """
    client, pool = worker.client, worker.work_pool
    default = (pool.base_job_template.get("variables", {}).get("properties", {})
               .get("manifest", {}).get("default")) or "default"
    pool_filter = WorkPoolFilter(name=WorkPoolFilterName(any_=[pool.name]))
    unfinished = await client.read_flow_runs(
        work_pool_filter=pool_filter,
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[t for t in StateType if t not in _FINAL]))))
    configs: dict[UUID, AzureVMJobConfiguration] = {}
    for flow_run in unfinished:
        if flow_run.id not in worker.following and flow_run.infrastructure_pid:
            configs[flow_run.id] = await worker.job_configuration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name=worker.name,
                worker_id=worker.backend_id)
    manifests = {default, *(c.manifest for c in configs.values())}
    for deployment in await client.read_deployments(work_pool_filter=pool_filter):
        manifests.add((deployment.job_variables or {}).get("manifest") or default)
    now = datetime.now(timezone.utc)
    live = {w.name for w in await client.read_workers_for_work_pool(pool.name)
            if w.name != worker.name and w.last_heartbeat_time is not None
            and (now - w.last_heartbeat_time).total_seconds()
            <= OWNER_SILENT_HEARTBEATS * (w.heartbeat_interval_seconds or 30)}
    found = []
    for manifest_name in sorted(manifests):
        try:
            manifest = await aload_manifest(manifest_name)
        except ManifestNotFound:  # e.g. the pool's default names no saved manifest
            if manifest_name == default:
                continue
            raise
        async with ArmClients(manifest) as clients:
            for vm in await azure_vm.list_vms(clients, manifest.resource_group,
                                              tag_filter={KIND_TAG: KIND, POOL_TAG: pool.name}):
                run_id = UUID(vm.tags[FLOW_RUN_TAG])
                if run_id in worker.following or vm.tags.get(WORKER_TAG) in live:
                    continue
                found.append(vm.name)
                run = await _adoptable(worker, clients, manifest, vm, run_id, configs.get(run_id))
                if run is not None:
                    worker.following.add(run_id)
                    worker.vm_count += 1
                    task_group.start_soon(_follow_adopted, run)
    return found


async def _adoptable(worker: AzureVMWorker, clients: ArmClients, manifest: AzureManifest,
                     vm: azure_vm.VMInfo, run_id: UUID,
                     config: AzureVMJobConfiguration | None) -> VMRun | None:
    """The VMRun to follow for an unfollowed VM; None once a VM whose run cannot go on (ended,
    gone, or never given its environment) was deleted."""
    try:
        flow_run = await worker.client.read_flow_run(run_id)
    except ObjectNotFound:
        flow_run = None
    final = flow_run is None or (flow_run.state is not None and flow_run.state.type in _FINAL)
    if final or config is None:
        if not final:  # its worker stopped before it shipped the run's environment
            await worker.client.set_flow_run_state(run_id, Crashed(message=(
                f"Flow run crashed: its worker stopped before the run started on VM {vm.name}")),
                force=True)
        worker.log.info("Deleting VM %s: its flow run %s cannot go on", vm.name, run_id)
        await _delete_vm(clients, manifest, vm)
        return None
    worker.get_flow_run_logger(flow_run).info(
        "Worker %r adopts VM %s (the worker that made it stopped)", worker.name, vm.name)
    return VMRun(worker, flow_run, config, manifest, vm, vm.tags.get(ADMIN_TAG, manifest.ssh_user),
                 time.monotonic())


async def _follow_adopted(run: VMRun) -> None:
    """Follow an adopted VM to its run's end; an error ends only this follow (the adoption
    loop and the other adopted runs go on, and the next round looks at the VM again)."""
    try:
        async with ArmClients(run.manifest) as clients, AsyncExitStack() as stack, \
                anyio.create_task_group() as streams:
            try:
                connection = await run.connect(stack)
                streams.start_soon(lambda: run.stream(connection, boot=False))
            except AzManagersError as exc:
                run.worker.log.warning("no output from adopted VM %s: %s", run.vm.name, exc)
            try:  # caught here: the task group would wrap it
                await run.follow(clients)
            except Exception as exc:  # noqa: BLE001 - reported; the next adoption round retries
                run.worker.log.error("following adopted VM %s failed: %s", run.vm.name, exc)
            streams.cancel_scope.cancel()
    except Exception as exc:  # noqa: BLE001 - e.g. no ARM client; the next round retries
        run.worker.log.error("following adopted VM %s failed: %s", run.vm.name, exc)
    finally:
        run.worker.vm_count -= 1
        run.worker.following.discard(run.flow_run.id)
