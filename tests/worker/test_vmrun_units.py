"""The azure-vm worker's follower and kill path with a fake Prefect client and fake ARM: a
Prefect API that does not answer for a while must not cost a healthy run its VM, nor end the
adoption of other VMs; `kill_vm` tells Prefect a VM that is gone; a bad `env` name fails before
any VM is made."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager
from types import SimpleNamespace

import anyio
import httpx
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import InfrastructureNotFound, PrefectHTTPStatusError
from prefect.states import Completed, Running

from prefect_azmanagers.azure import vm as azure_vm
from prefect_azmanagers.exceptions import (
    AzManagersError,
    ConfigurationError,
    PrefectAPIUnreachable,
    ResourceMissing,
)
from prefect_azmanagers.workers import vmrun
from prefect_azmanagers.workers.azure_vm import AzureVMJobConfiguration

pytestmark = pytest.mark.anyio
LOG = logging.getLogger("test-vmrun")


def _http_error(status: int) -> PrefectHTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1:4200/api/flow_runs/x")
    return PrefectHTTPStatusError.from_httpx_error(httpx.HTTPStatusError(
        "error", request=request, response=httpx.Response(status, request=request)))


class FakeClient:
    """read_flow_run answers from `script`: an exception is raised, a state is returned in
    the run; the last entry repeats."""

    def __init__(self, flow_run: FlowRun, script: list):
        self.flow_run, self.script, self.reads, self.states = flow_run, script, 0, []

    async def read_flow_run(self, flow_run_id):
        step = self.script[min(self.reads, len(self.script) - 1)]
        self.reads += 1
        if isinstance(step, BaseException):
            raise step
        return self.flow_run.model_copy(update={"state": step})

    async def set_flow_run_state(self, flow_run_id, state, force=False):
        self.states.append(state)


def _run(script: list, **config) -> vmrun.VMRun:
    flow_run = FlowRun(id=uuid.uuid4(), name="fake-run", flow_id=uuid.uuid4())
    worker = SimpleNamespace(client=FakeClient(flow_run, script), log=LOG, name="w",
                             work_pool=SimpleNamespace(name="pool"), following={flow_run.id},
                             vm_count=1, get_flow_run_logger=lambda _run: LOG)
    vm = azure_vm.VMInfo("pool-abcdef", "vm-id", "10.0.0.4", "pool-abcdef-nic", "rg")
    return vmrun.VMRun(worker, flow_run, AzureVMJobConfiguration(**config), None, vm, "azureuser",
                       created=time.monotonic())


@pytest.fixture
def deleted(monkeypatch):
    """The VMs `_delete_vm` was asked to delete; the polls and backoffs made fast."""
    names: list[str] = []

    async def delete(clients, manifest, vm):
        names.append(vm.name)

    monkeypatch.setattr(vmrun, "_delete_vm", delete)
    monkeypatch.setattr(vmrun, "STATE_POLL_SECONDS", 0.01)
    monkeypatch.setattr(vmrun, "API_BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(vmrun, "API_BACKOFF_MAX", 0.05)
    monkeypatch.setattr(vmrun, "ENGINE_DRAIN_SECONDS", 0.2)
    return names


async def test_a_prefect_api_blip_is_retried_and_the_run_followed_to_its_end(deleted):
    run = _run([Running(), httpx.ConnectError("refused"), _http_error(503),
                             httpx.ReadTimeout("slow"), Running(), Completed()])
    assert await run.follow(clients=None) == Completed().type
    assert deleted == ["pool-abcdef"]  # once, at the run's end
    assert run.worker.client.reads == 6


async def test_a_prefect_api_down_past_the_bound_stops_following_and_keeps_the_vm(deleted,
                                                                                monkeypatch):
    monkeypatch.setattr(vmrun, "API_RETRY_SECONDS", 0.3)
    run = _run([Running(), httpx.ConnectError("refused")])
    with pytest.raises(PrefectAPIUnreachable, match=r"Stopped following VM pool-abcdef .* did not "
                       r"answer for 0 s .* ConnectError.* The VM keeps running; a worker of pool "
                       r"pool adopts it"):
        await run.follow(clients=None)
    assert deleted == []
    assert run.worker.client.reads > 3  # retried, with backoff, until the bound


async def test_a_prefect_api_error_that_is_no_blip_is_raised_at_once(deleted):
    run = _run([_http_error(404)])
    with pytest.raises(PrefectHTTPStatusError):
        await run.follow(clients=None)
    assert run.worker.client.reads == 1


async def test_a_run_whose_api_stays_down_keeps_its_vm_for_adoption(deleted, monkeypatch):
    """The worker's own run: `_run_on_vm` deletes the VM on errors, but not when the API is
    only unreachable (the run may be healthy; adoption takes the VM back)."""
    monkeypatch.setattr(vmrun, "API_RETRY_SECONDS", 0.2)
    run = _run([httpx.ConnectError("refused")])

    async def connect(self, stack):
        return SimpleNamespace()

    async def stream(self, connection, *, boot):
        await anyio.sleep_forever()

    async def write(connection, path, data):
        return None

    monkeypatch.setattr(vmrun.VMRun, "connect", connect)
    monkeypatch.setattr(vmrun.VMRun, "stream", stream)
    monkeypatch.setattr(vmrun, "_write_private_file", write)
    started = []
    with pytest.raises(PrefectAPIUnreachable):
        await vmrun._run_on_vm(None, run, b"", SimpleNamespace(started=started.append))
    assert started == ["rg/pool-abcdef"] and deleted == []


async def test_an_adopted_follow_that_fails_ends_alone(deleted, monkeypatch):
    """An adopted run whose follow fails is reported and let go (the next adoption round looks
    at its VM again); the error does not reach the adoption task group."""
    monkeypatch.setattr(vmrun, "API_RETRY_SECONDS", 0.2)

    @asynccontextmanager
    async def arm(manifest):
        yield None

    async def no_ssh(self, stack):
        raise AzManagersError("no SSH")

    monkeypatch.setattr(vmrun, "ArmClients", arm)
    monkeypatch.setattr(vmrun.VMRun, "connect", no_ssh)
    failing = _run([httpx.ConnectError("refused")])
    healthy = _run([Running()] * 20 + [Completed()])
    clients = {run.flow_run.id: run.worker.client for run in (failing, healthy)}
    worker = failing.worker  # one worker adopted both; its client answers per run
    worker.client = SimpleNamespace(read_flow_run=lambda i: clients[i].read_flow_run(i))
    worker.following, worker.vm_count = set(clients), 2
    healthy.worker = worker
    async with anyio.create_task_group() as group:
        group.start_soon(vmrun._follow_adopted, failing)
        group.start_soon(vmrun._follow_adopted, healthy)
    assert deleted == ["pool-abcdef"]  # only the healthy run's, at its end
    assert worker.following == set() and worker.vm_count == 0


async def test_kill_vm_deletes_the_vm_and_says_when_it_is_gone(monkeypatch):
    vms = {("rg", "pool-abcdef"): azure_vm.VMInfo("pool-abcdef", "vm-id", "10.0.0.4",
                                                  "pool-abcdef-nic", "rg")}
    deleted = []

    async def load(name):
        return SimpleNamespace(name=name)

    @asynccontextmanager
    async def arm(manifest):
        yield None

    async def get_vm(clients, group, name):
        try:
            return vms[(group, name)]
        except KeyError:
            raise ResourceMissing(f"VM {name} not found") from None

    async def delete(clients, manifest, vm):
        deleted.append(vm.name)
        vms.pop((vm.resource_group, vm.name))

    monkeypatch.setattr(vmrun, "aload_manifest", load)
    monkeypatch.setattr(vmrun, "ArmClients", arm)
    monkeypatch.setattr(vmrun.azure_vm, "get_vm", get_vm)
    monkeypatch.setattr(vmrun, "_delete_vm", delete)
    config = AzureVMJobConfiguration(manifest="localcloud")
    await vmrun.kill_vm("rg/pool-abcdef", config)
    assert deleted == ["pool-abcdef"]
    with pytest.raises(InfrastructureNotFound, match="VM pool-abcdef in rg no longer exists"):
        await vmrun.kill_vm("rg/pool-abcdef", config)


async def test_a_bad_env_name_fails_the_run_before_any_vm_is_made(monkeypatch):
    async def manifest(name):
        return SimpleNamespace(ssh_user="azureuser", python="python3", result_storage_slug=None,
                               prefect_api_url_for_vms="http://10.0.0.4:4200/api")

    async def template(name):
        return SimpleNamespace(value={"properties": {"osProfile": {"adminUsername": "azureuser"}}})

    async def create_vm(*args, **kwargs):
        raise AssertionError("a VM was made for a run whose env cannot be written")

    monkeypatch.setattr(vmrun, "aload_manifest", manifest)
    monkeypatch.setattr(vmrun, "aload_vm_template", template)
    monkeypatch.setattr(vmrun.azure_vm, "create_vm", create_vm)
    flow_run = FlowRun(id=uuid.uuid4(), name="fake-run", flow_id=uuid.uuid4())
    config = AzureVMJobConfiguration(vm_template="t", env={"MY-SETTING": "1"})
    with pytest.raises(ConfigurationError, match="'MY-SETTING' is not a valid shell name"):
        await vmrun.run_flow_run(SimpleNamespace(), flow_run, config, None)


async def test_a_completed_runs_vm_is_deleted_only_once_its_engine_exited(deleted, monkeypatch):
    """The engine sends the flow's last log lines as it exits, after the final state."""
    monkeypatch.setattr(vmrun, "ENGINE_DRAIN_SECONDS", 30.0)
    run = _run([Completed()])
    following = []

    async def exits_later() -> None:
        await anyio.sleep(0.3)
        following.append(list(deleted))  # nothing deleted while the engine still runs
        run.engine_exit = 0

    async with anyio.create_task_group() as group:
        group.start_soon(exits_later)
        assert await run.follow(clients=None) == Completed().type
    assert following == [[]] and deleted == ["pool-abcdef"]


async def test_an_engine_that_never_says_it_exited_delays_the_deletion_boundedly(deleted):
    run = _run([Completed()])  # ENGINE_DRAIN_SECONDS is 0.2 here
    started = time.monotonic()
    assert await run.follow(clients=None) == Completed().type
    assert deleted == ["pool-abcdef"] and time.monotonic() - started >= 0.2
