"""Helpers of the azure-vm worker's e2e files: the deployment's flow run, its logs, ARM calls
with the local cloud's manifest, waiting for states."""

from __future__ import annotations

import time

from tests.worker.conftest import eventually


def flow_run_of(deployment_name: str):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[deployment_name])))
        return flow_run


def on_arm(operation):
    """operation(clients, manifest) with the `localcloud` manifest's ARM clients; its result."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    from prefect_azmanagers.azure.clients import ArmClients
    from prefect_azmanagers.blocks import load_manifest

    manifest = load_manifest("localcloud")

    async def call():
        async with ArmClients(manifest) as clients:
            return await operation(clients, manifest)

    return run_coro_as_sync(call())


def messages_of(flow_run_id) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def run_deployment(deployment: str) -> str:
    """A run of `deployment`, made through the API as `prefect deployment run` makes it (the
    CLI's own path is in test_worker_e2e) without a CLI process per run; returns its id."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        return str(client.create_flow_run_from_deployment(deployment_id).id)


def wait_for_run(flow_run_id: str, predicate, what: str, timeout: float):
    """The flow run once predicate(flow_run) holds."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        def probe():
            flow_run = client.read_flow_run(flow_run_id)
            return flow_run if predicate(flow_run) else None

        return eventually(probe, what, timeout)


def running_on_vm(flow_run_id: str, timeout: float = 300):
    """Wait until the sleeper flow logged that it started; returns the flow run."""
    wait_for_run(flow_run_id, lambda r: any(m.startswith("sleeper started on ")
                                         for m in messages_of(r.id)), "the sleeper's start", timeout)
    return wait_for_run(flow_run_id, lambda r: r.infrastructure_pid, "the infrastructure pid", 30)


def assert_state_stays(flow_run_id, state_type: str) -> None:
    """The run's final state is still `state_type` a few seconds after its VM is gone, when
    the worker is done with the run (it must not propose Crashed over it)."""
    time.sleep(5)
    state = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the final state", 10).state
    assert state.type.value == state_type, state
