"""The `azure-vm` work-pool type: every flow run on an Azure VM of its own, deleted afterwards.

    prefect work-pool create my-pool --type azure-vm
    prefect worker start --pool my-pool
    prefect deployment run my-flow/my-deployment --job-variable vm_template=my-vm-template

This is AzManagers' `@detach vm(...; persist=false)` done the Prefect way: the job variables
below are the form the UI shows for the pool (a deployment overrides any of them with
`job_variables`, a run with `--job-variable`); for each flow run the worker makes a VM whose
boot script starts Prefect's own engine (`prefect flow-run execute <id>`), which runs the
deployment's pull steps (git clone, a storage pull) and reports to the Prefect API. The
worker streams the VM's output, follows the VM and the run, and deletes the VM once the run
has ended (`vmrun`). Cancellation deletes the VM (`kill_infrastructure`); VMs outlive a
stopped or killed worker and the next worker of the pool adopts them (`adopt_once`).
docs/architecture.md, "The azure-vm worker", holds the contract.
"""

from __future__ import annotations

from typing import Any, Optional
from uuid import UUID

import anyio
import anyio.abc
from prefect.client.schemas.objects import FlowRun
from prefect.logging.loggers import get_worker_logger
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field

WORKER_TYPE = "azure-vm"
ADOPT_SECONDS = 30.0  # how often a worker looks for VMs of its pool that no live worker follows


class AzureVMVariables(BaseVariables):
    """Job variables of an azure-vm work pool (the UI's form, with these defaults)."""

    command: Optional[str] = Field(default=None, description=(
        "Leave empty: the VM runs `python -m prefect flow-run execute <id>`. Otherwise a shell "
        "command run instead, with the run's environment."))
    manifest: str = Field(default="default", description="Name of the AzureManifest block "
                          "(subscription, resource group, SSH key, Prefect API for VMs).")
    vm_template: Optional[str] = Field(default=None, title="VM template", description=(
        "Name of the VMTemplate block the flow run's VM is made from (required)."))
    nic_template: Optional[str] = Field(default=None, title="NIC template", description=(
        "Name of the NICTemplate block; empty: copy the NIC the VM template references."))
    spot: bool = Field(default=False, description="Run on a Spot VM (evicted when Azure needs "
                       "the capacity; the run then ends Crashed).")
    max_price: float = Field(default=-1, description="Spot: the most to pay per hour; -1 is up "
                             "to the on-demand price.")
    customenv: bool = Field(default=False, description="Build the worker's Python environment "
                            "on the VM at boot and run the flow in it.")
    os_disk_size: Optional[int] = Field(default=None, title="OS disk size (GB)",
                                        description="Override the template's OS disk size.")
    image_name: Optional[str] = Field(default=None, description="Override the image name of the "
                                      "template's image id (.../images/NAME).")
    image_version: Optional[str] = Field(default=None, description="Override the gallery image "
                                         "version of the template's image id.")
    basename: str = Field(default="azmrun", description="VM names are BASENAME-xxxxxx.")
    boot_timeout: float = Field(default=600, title="Boot timeout (s)", description=(
        "Seconds from the VM's creation to the flow run starting; then the run is Crashed."))
    keep_on_failure: float = Field(default=0, title="Keep on failure (s)", description=(
        "Keep the VM this many seconds after a run that did not complete, to debug it over SSH."))


class AzureVMJobConfiguration(BaseJobConfiguration):
    """One flow run's VM, resolved from the pool's template and the deployment's overrides."""

    manifest: str = Field(default="default")
    vm_template: Optional[str] = Field(default=None)
    nic_template: Optional[str] = Field(default=None)
    spot: bool = Field(default=False)
    max_price: float = Field(default=-1)
    customenv: bool = Field(default=False)
    os_disk_size: Optional[int] = Field(default=None)
    image_name: Optional[str] = Field(default=None)
    image_version: Optional[str] = Field(default=None)
    basename: str = Field(default="azmrun")
    boot_timeout: float = Field(default=600)
    keep_on_failure: float = Field(default=0)


class AzureVMWorkerResult(BaseWorkerResult):
    """`identifier` is the VM (`resource_group/name`); `status_code` is 0 once the worker saw
    the run to its end (the run's state says how it ended)."""


class AzureVMWorker(BaseWorker[AzureVMJobConfiguration, AzureVMVariables, AzureVMWorkerResult]):
    """Runs each flow run on a fresh Azure VM (or a local-cloud VM), deleted when the run ends."""

    type = WORKER_TYPE
    job_configuration = AzureVMJobConfiguration
    job_configuration_variables = AzureVMVariables

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.following: set[UUID] = set()  # flow runs whose VM this worker follows
        self.vm_count = 0                  # VMs of this worker that exist (made, not yet deleted)
        self._adoption: anyio.abc.TaskGroup | None = None

    @property
    def log(self) -> Any:
        """The worker's own logger (the console of `prefect worker start`)."""
        return get_worker_logger(self)

    async def setup(self) -> None:
        await super().setup()
        self._adoption = anyio.create_task_group()
        await self._adoption.__aenter__()
        self._adoption.start_soon(self._adopt_loop)

    async def teardown(self, *exc_info: Any) -> None:
        if self._adoption is not None:  # adopted runs' VMs stay for the next worker
            self._adoption.cancel_scope.cancel()
            await self._adoption.__aexit__(None, None, None)
            self._adoption = None
        await super().teardown(*exc_info)

    async def run(self, flow_run: FlowRun, configuration: AzureVMJobConfiguration,
                  task_status: Optional[anyio.abc.TaskStatus[str]] = None) -> AzureVMWorkerResult:
        """Create the run's VM, ship its environment, follow it to the end, delete it.

        `task_status` gets `resource_group/name` (the run's infrastructure pid) once the engine
        may start; a failure before that leaves no VM and the run Crashed with the error.
        """
        from prefect_azmanagers.workers import vmrun  # the Azure SDK only when a run comes

        while (limit := self.work_pool.concurrency_limit) and self.vm_count >= limit:
            await anyio.sleep(0.5)  # VMs of ended runs still being deleted count against it
        self.following.add(flow_run.id)
        self.vm_count += 1
        try:
            vm = await vmrun.run_flow_run(self, flow_run, configuration, task_status)
        finally:
            self.vm_count -= 1
            self.following.discard(flow_run.id)
        # 0 whatever the run's end: its state is final or rescheduled already; a non-zero code
        # makes Prefect propose Crashed, which would end a rescheduled run
        return AzureVMWorkerResult(identifier=vm, status_code=0)

    async def kill_infrastructure(self, infrastructure_pid: str,
                                  configuration: AzureVMJobConfiguration,
                                  grace_seconds: int = 30) -> None:
        """Delete the run's VM and NIC (cancellation of a run from the UI or CLI);
        InfrastructureNotFound if it is gone already."""
        from prefect_azmanagers.workers import vmrun

        await vmrun.kill_vm(infrastructure_pid, configuration)

    async def _adopt_loop(self) -> None:
        while True:
            try:
                await self.adopt_once()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                self.log.warning("looking for VMs of pool %s to adopt failed: %s",
                                 self.work_pool.name, exc)
            await anyio.sleep(ADOPT_SECONDS)

    async def adopt_once(self) -> list[str]:
        """Find VMs of this pool that no live worker follows (their worker was stopped or
        killed): follow those whose run goes on, delete the others. Returns their names."""
        from prefect_azmanagers.workers import vmrun

        try:
            self.work_pool
        except RuntimeError:  # not synced with the API yet
            return []
        assert self._adoption is not None
        return await vmrun.adopt(self, self._adoption)
