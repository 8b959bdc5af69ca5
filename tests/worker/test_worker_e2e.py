"""The azure-vm worker end to end on the local cloud: a real Prefect server, `prefect worker
start` as a subprocess, the real Azure SDK against the local ARM endpoint, and VMs (sandboxes
with OpenSSH) that clone the deployment's code with Prefect's git_clone pull step and run
`prefect flow-run execute` there.

The core paths: completed, failed, cancelled, code from git, results in Blob Storage. Lost
VMs are in test_worker_lost_vm_e2e.py, worker restarts and pool limits in
test_worker_pool_e2e.py: separate files run in parallel."""

from __future__ import annotations

import time

import pytest

from tests.worker.conftest import cli
from tests.worker.runs import (
    assert_state_stays,
    flow_run_of,
    messages_of,
    run_deployment,
    running_on_vm,
    wait_for_run,
)

pytestmark = pytest.mark.e2e


def test_deployment_run_completes_on_a_fresh_vm_and_the_vm_is_gone(vm_pool, vm_worker,
                                                                    assert_nothing_left):
    deployment = vm_pool("flows.py:hello", "hello", parameters={"name": "azure-vm"})
    run = cli("deployment", "run", deployment, "--watch", "--watch-timeout", "400", timeout=500,
              check=False)
    flow_run = flow_run_of("hello")
    assert run.returncode == 0 and "Completed" in run.stdout, (
        run.stdout + "\n".join(messages_of(flow_run.id)) + vm_worker.output()[-4000:])
    assert flow_run.state.is_completed()
    vm_name = flow_run.infrastructure_pid.split("/", 1)[1]
    assert vm_name.startswith(f"{vm_pool.pool}-")
    messages = messages_of(flow_run.id)
    assert f"hello azure-vm from {vm_name}" in messages      # the flow ran on that VM
    assert any(m.startswith(f"[{vm_name} boot] ") for m in messages)  # the VM's boot output
    assert f"[{vm_name}] prefect-azmanagers: starting the engine" in vm_worker.output()
    assert_nothing_left(vm_pool.pool)


def test_failing_flow_ends_failed_and_its_vm_is_gone(vm_pool, vm_worker, assert_nothing_left):
    deployment = vm_pool("flows.py:fails", "fails")
    run = cli("deployment", "run", deployment, "--watch", "--watch-timeout", "400", timeout=500,
              check=False)
    assert run.returncode != 0
    flow_run = flow_run_of("fails")
    assert flow_run.state.is_failed(), flow_run.state
    assert any("this flow fails on purpose" in m for m in messages_of(flow_run.id))
    assert_nothing_left(vm_pool.pool)
    assert_state_stays(flow_run.id, "FAILED")


def test_cancelling_a_running_flow_ends_cancelled_and_deletes_its_vm(vm_pool, vm_worker,
                                                                     assert_nothing_left):
    flow_run_id = run_deployment(vm_pool("flows.py:sleeper", "sleeper"))
    running_on_vm(flow_run_id)
    cancelled_at = time.monotonic()
    cli("flow-run", "cancel", flow_run_id)
    flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the cancellation", 120)
    assert flow_run.state.is_cancelled(), flow_run.state
    assert_nothing_left(vm_pool.pool, timeout=60)
    print(f"cancel -> Cancelled and VM gone in {time.monotonic() - cancelled_at:.1f} s")
    assert_state_stays(flow_run_id, "CANCELLED")


def test_the_prefect_yaml_deployment_runs_on_a_vm_cloned_from_git(vm_pool, vm_worker,
                                                                  assert_nothing_left):
    """prefect.yaml's hello-vm, deployed into the module's pool: `prefect deploy`, then
    `deployment run --watch`; the VM clones this repository (its committed HEAD, from a bare
    copy at a path the VMs see)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    copy = Path(tempfile.mkdtemp(prefix="azm-worker-repo-", dir="/var/tmp"))
    pool = vm_pool.pool  # the pool's teardown deletes the deployment
    try:
        subprocess.run(["git", "clone", "-q", "--bare", "--depth", "1", f"file://{repo}",
                        str(copy / "repo.git")], check=True)
        (copy / "gitconfig").write_text("[safe]\n\tdirectory = *\n")
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        env = dict(os.environ, AZM_VM_POOL=pool, AZM_GIT_REPO=f"file://{copy / 'repo.git'}")
        deployed = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "hello-vm"],
            cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        # Run-level job variables merge over prefect.yaml's (`prefect deploy --job-variable`
        # would replace them all: prefect 3.9.1 resets job_variables when it is given).
        run = cli("deployment", "run", "detached-hello/hello-vm", "--watch", "--watch-timeout",
                  "400", "--job-variable", f"basename={pool}", "--job-variable",
                  "env=" + json.dumps({"GIT_CONFIG_GLOBAL": str(copy / "gitconfig")}),
                  timeout=500, check=False)
        flow_run = flow_run_of("hello-vm")
        assert run.returncode == 0 and flow_run.state.is_completed(), (
            run.stdout + "\n".join(messages_of(flow_run.id)))
        vm_name = flow_run.infrastructure_pid.split("/", 1)[1]
        assert vm_name.startswith(f"{pool}-")  # the run's --job-variable basename
        assert any(m.startswith(f"hello AZURE-VM WORLD from {vm_name}")
                   for m in messages_of(flow_run.id))
        assert_nothing_left(pool)
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_cancelling_a_run_whose_engine_has_not_started_deletes_its_vm(vm_pool, vm_worker,
                                                                       assert_nothing_left):
    """Cancelled once the VM exists but before the engine reports Running: the follower
    deletes the VM (the VM's engine ends the run Cancelled, or the worker does after its
    grace). Prefect 3.9.1's worker-side cancellation (kill_infrastructure) does not act here
    even with PREFECT_WORKER_ENABLE_CANCELLATION=true: it watches only runs still being
    submitted, and a run has its infrastructure pid only once submitted."""
    flow_run_id = run_deployment(vm_pool("flows.py:sleeper", "sleeper-early"))
    flow_run = wait_for_run(flow_run_id, lambda r: r.infrastructure_pid, "the VM", 300)
    assert not flow_run.state.is_running(), "the engine started too soon for this test"
    cli("flow-run", "cancel", flow_run_id)
    flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the cancellation", 120)
    assert flow_run.state.is_cancelled(), flow_run.state
    assert_nothing_left(vm_pool.pool)
    print(f"cancelled before the engine started: {flow_run.state.message}")


def test_the_runs_result_is_persisted_in_the_manifests_blob_container(vm_pool, vm_worker,
                                                                      assert_nothing_left):
    """The localcloud manifest names a blob container (Azurite): the VM's flow run gets it as
    its default result storage, so the result is read back here from Blob Storage."""
    from prefect.results import ResultRecordMetadata
    from prefect_azure import AzureBlobStorageContainer

    run = cli("deployment", "run", vm_pool("flows.py:persisted", "persisted"), "--watch",
              "--watch-timeout", "400", timeout=500, check=False)
    flow_run = flow_run_of("persisted")
    assert run.returncode == 0 and flow_run.state.is_completed(), (
        run.stdout + "\n".join(messages_of(flow_run.id)))
    container = AzureBlobStorageContainer.load("localcloud")
    record = flow_run.state.data
    assert isinstance(record, ResultRecordMetadata), record
    assert record.storage_block_id == container._block_document_id
    assert record.storage_key in container.list_blobs()
    vm_name = flow_run.infrastructure_pid.split("/", 1)[1]
    assert flow_run.state.result() == {"squares": [0, 1, 4, 9], "host": vm_name}
    assert_nothing_left(vm_pool.pool)
