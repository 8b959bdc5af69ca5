"""The azure-vm worker end to end on the local cloud: a real Prefect server, `prefect worker
start` as a subprocess, the real Azure SDK against the local ARM endpoint, and VMs (sandboxes
with OpenSSH) that clone the deployment's code with Prefect's git_clone pull step and run
`prefect flow-run execute` there."""

from __future__ import annotations

import time

import pytest

from tests.worker.conftest import cli

pytestmark = pytest.mark.e2e


def _flow_run(deployment_name: str):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[deployment_name])))
        return flow_run


def _messages(flow_run_id) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def test_deployment_run_completes_on_a_fresh_vm_and_the_vm_is_gone(vm_pool, vm_worker,
                                                                    assert_nothing_left):
    deployment = vm_pool("flows.py:hello", "hello", parameters={"name": "azure-vm"})
    run = cli("deployment", "run", deployment, "--watch", "--watch-timeout", "400", timeout=500,
              check=False)
    flow_run = _flow_run("hello")
    assert run.returncode == 0 and "Completed" in run.stdout, (
        run.stdout + "\n".join(_messages(flow_run.id)) + vm_worker.output()[-4000:])
    assert flow_run.state.is_completed()
    vm_name = flow_run.infrastructure_pid.split("/", 1)[1]
    assert vm_name.startswith(f"{vm_pool.pool}-")
    messages = _messages(flow_run.id)
    assert f"hello azure-vm from {vm_name}" in messages      # the flow ran on that VM
    assert any(m.startswith(f"[{vm_name} boot] ") for m in messages)  # the VM's boot output
    assert f"[{vm_name}] prefect-azmanagers: starting the engine" in vm_worker.output()
    assert_nothing_left(vm_pool.pool)
