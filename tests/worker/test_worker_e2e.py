"""The azure-vm worker end to end on the local cloud: a real Prefect server, `prefect worker
start` as a subprocess, the real Azure SDK against the local ARM endpoint, and VMs (sandboxes
with OpenSSH) that clone the deployment's code with Prefect's git_clone pull step and run
`prefect flow-run execute` there."""

from __future__ import annotations

import time

import pytest

from tests.worker.conftest import cli, eventually

pytestmark = pytest.mark.e2e


def _flow_run(deployment_name: str):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[deployment_name])))
        return flow_run


def _on_arm(operation):
    """operation(clients, manifest) with the `localcloud` manifest's ARM clients; its result."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    from prefect_azmanagers.azure.clients import ArmClients
    from prefect_azmanagers.blocks import load_manifest

    manifest = load_manifest("localcloud")

    async def call():
        async with ArmClients(manifest) as clients:
            return await operation(clients, manifest)

    return run_coro_as_sync(call())


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


def _run_deployment(deployment: str) -> str:
    """`prefect deployment run` without watching; returns the flow run's id."""
    run = cli("deployment", "run", deployment)
    return run.stdout.split("UUID: ", 1)[1].split()[0]


def _wait_for(flow_run_id: str, predicate, what: str, timeout: float):
    """The flow run once predicate(flow_run) holds."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        def probe():
            flow_run = client.read_flow_run(flow_run_id)
            return flow_run if predicate(flow_run) else None

        return eventually(probe, what, timeout)


def _running_on_vm(flow_run_id: str, timeout: float = 300):
    """Wait until the sleeper flow logged that it started; returns the flow run."""
    _wait_for(flow_run_id, lambda r: any(m.startswith("sleeper started on ")
                                         for m in _messages(r.id)), "the sleeper's start", timeout)
    return _wait_for(flow_run_id, lambda r: r.infrastructure_pid, "the infrastructure pid", 30)


def _assert_state_stays(flow_run_id, state_type: str) -> None:
    """The run's final state is still `state_type` a few seconds after its VM is gone, when
    the worker is done with the run (it must not propose Crashed over it)."""
    time.sleep(5)
    state = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the final state", 10).state
    assert state.type.value == state_type, state


def test_failing_flow_ends_failed_and_its_vm_is_gone(vm_pool, vm_worker, assert_nothing_left):
    deployment = vm_pool("flows.py:fails", "fails")
    run = cli("deployment", "run", deployment, "--watch", "--watch-timeout", "400", timeout=500,
              check=False)
    assert run.returncode != 0
    flow_run = _flow_run("fails")
    assert flow_run.state.is_failed(), flow_run.state
    assert any("this flow fails on purpose" in m for m in _messages(flow_run.id))
    assert_nothing_left(vm_pool.pool)
    _assert_state_stays(flow_run.id, "FAILED")


def test_cancelling_a_running_flow_ends_cancelled_and_deletes_its_vm(vm_pool, vm_worker,
                                                                     assert_nothing_left):
    flow_run_id = _run_deployment(vm_pool("flows.py:sleeper", "sleeper"))
    _running_on_vm(flow_run_id)
    cancelled_at = time.monotonic()
    cli("flow-run", "cancel", flow_run_id)
    flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the cancellation", 120)
    assert flow_run.state.is_cancelled(), flow_run.state
    assert_nothing_left(vm_pool.pool, timeout=60)
    print(f"cancel -> Cancelled and VM gone in {time.monotonic() - cancelled_at:.1f} s")
    _assert_state_stays(flow_run_id, "CANCELLED")


def test_a_vm_deleted_under_a_running_flow_makes_it_crashed(vm_pool, vm_worker, localcloud,
                                                            assert_nothing_left):
    from prefect_azmanagers.azure import vm as azure_vm

    flow_run_id = _run_deployment(vm_pool("flows.py:sleeper", "sleeper"))
    group, name = _running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)
    vm = _on_arm(lambda clients, _: azure_vm.get_vm(clients, group, name))
    assert vm.tags["azmanagers-flow-run"] == flow_run_id      # the run's id in the VM's tags
    assert vm.tags["azmanagers-work-pool"] == vm_pool.pool
    assert vm.tags["azmanagers-kind"] == "azure-vm"
    _on_arm(lambda clients, _: azure_vm.delete_vm(clients, group, name))  # as in the portal
    flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
    assert flow_run.state.is_crashed(), flow_run.state
    assert f"VM {name} no longer exists" in flow_run.state.message
    assert_nothing_left(vm_pool.pool)


def test_a_spot_eviction_mid_run_ends_crashed_with_the_reason(vm_pool, vm_worker, localcloud,
                                                              assert_nothing_left):
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    flow_run_id = _run_deployment(vm_pool("flows.py:sleeper", "spot-sleeper", spot=True))
    group, name = _running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)

    with LocalCloudAdmin.from_info(localcloud) as admin:
        notice = admin.status()["settings"]["eviction_notice"]
        admin.settings(eviction_notice=3)
        try:
            _on_arm(lambda clients, _: clients.compute.virtual_machines.simulate_eviction(
                group, name))
            flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
        finally:
            admin.settings(eviction_notice=notice)
    assert flow_run.state.is_crashed(), flow_run.state
    assert f"VM {name} no longer exists (evicted or deleted)" in flow_run.state.message
    assert_nothing_left(vm_pool.pool)


def test_a_killed_worker_restarted_mid_run_leaves_nothing_behind(vm_pool, tmp_path,
                                                                 assert_nothing_left):
    import signal

    from tests.worker.conftest import WorkerProcess

    deployment = vm_pool("flows.py:sleeper", "short-sleeper", parameters={"seconds": 90})
    first = WorkerProcess(vm_pool.pool, tmp_path / "first.log")
    first.start()
    try:
        flow_run_id = _run_deployment(deployment)
        vm_name = _running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)[1]
    finally:
        first.stop(signal.SIGKILL)   # no cleanup at all: the VM keeps running the flow
    second = WorkerProcess(vm_pool.pool, tmp_path / "second.log")
    second.start()
    try:
        flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the run's end", 300)
        assert flow_run.state.is_completed(), flow_run.state
        assert_nothing_left(vm_pool.pool, timeout=120)
    finally:
        second.stop()
    assert f"adopts VM {vm_name}" in "\n".join(_messages(flow_run_id))


def test_a_pool_concurrency_limit_of_2_bounds_the_vms(vm_pool, vm_worker, localcloud,
                                                      assert_nothing_left):
    from prefect import get_client

    from tests.worker.conftest import leftovers

    cli("work-pool", "set-concurrency-limit", vm_pool.pool, "2")
    deployment = vm_pool("flows.py:hello", "hello-many")
    flow_run_ids = [_run_deployment(deployment) for _ in range(5)]
    most, deadline = 0, time.monotonic() + 900
    with get_client(sync_client=True) as client:
        while not all(client.read_flow_run(i).state.is_final() for i in flow_run_ids):
            assert time.monotonic() < deadline, "the 5 runs did not end"
            vms = [x for x in leftovers(localcloud, vm_pool.pool) if x.startswith("ARM VM ")]
            most = max(most, len(vms))
            assert most <= 2, vms
            time.sleep(0.5)
        assert all(client.read_flow_run(i).state.is_completed() for i in flow_run_ids)
    assert most == 2, f"the 5 runs never had 2 VMs at once (at most {most}): the limit was not used"
    assert_nothing_left(vm_pool.pool)


def test_the_prefect_yaml_deployment_runs_on_a_vm_cloned_from_git(localcloud, tmp_path,
                                                                  assert_nothing_left):
    """prefect.yaml's hello-vm: `prefect deploy`, then `deployment run --watch`; the VM clones
    this repository (its committed HEAD, from a bare copy at a path the VMs see)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    import uuid
    from pathlib import Path

    from prefect import get_client

    from tests.worker.conftest import WorkerProcess

    repo = Path(__file__).resolve().parents[2]
    copy = Path(tempfile.mkdtemp(prefix="azm-worker-repo-", dir="/var/tmp"))
    pool = f"azmyaml-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess(pool, tmp_path / "worker.log")
    try:
        subprocess.run(["git", "clone", "-q", "--bare", "--depth", "1", f"file://{repo}",
                        str(copy / "repo.git")], check=True)
        (copy / "gitconfig").write_text("[safe]\n\tdirectory = *\n")
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        cli("work-pool", "create", pool, "--type", "azure-vm")
        worker.start()
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
        flow_run = _flow_run("hello-vm")
        assert run.returncode == 0 and flow_run.state.is_completed(), (
            run.stdout + "\n".join(_messages(flow_run.id)))
        vm_name = flow_run.infrastructure_pid.split("/", 1)[1]
        assert vm_name.startswith(f"{pool}-")  # the run's --job-variable basename
        assert any(m.startswith(f"hello AZURE-VM WORLD from {vm_name}")
                   for m in _messages(flow_run.id))
        assert_nothing_left(pool)
    finally:
        worker.stop()
        shutil.rmtree(copy, ignore_errors=True)
        with get_client(sync_client=True) as client:
            for deployment in client.read_deployments():
                if deployment.work_pool_name == pool:
                    client.delete_deployment(deployment.id)
            client.delete_work_pool(pool)


def test_a_vm_that_fails_to_boot_crashes_the_run_and_leaves_nothing(vm_pool, vm_worker,
                                                                     localcloud,
                                                                     assert_nothing_left):
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    deployment = vm_pool("flows.py:hello", "hello-bootfail")
    with LocalCloudAdmin.from_info(localcloud) as admin:
        admin.boot_fail(1)
        try:
            flow_run_id = _run_deployment(deployment)
            flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
        finally:
            admin.clear_faults()
    assert flow_run.state.is_crashed(), flow_run.state
    assert "boot failure injected" in flow_run.state.message
    assert_nothing_left(vm_pool.pool)


def test_cancelling_a_run_whose_engine_has_not_started_deletes_its_vm(vm_pool, vm_worker,
                                                                       assert_nothing_left):
    """Cancelled once the VM exists but before the engine reports Running: the follower
    deletes the VM (the VM's engine ends the run Cancelled, or the worker does after its
    grace). Prefect 3.9.1's worker-side cancellation (kill_infrastructure) does not act here
    even with PREFECT_WORKER_ENABLE_CANCELLATION=true: it watches only runs still being
    submitted, and a run has its infrastructure pid only once submitted."""
    flow_run_id = _run_deployment(vm_pool("flows.py:sleeper", "sleeper-early"))
    flow_run = _wait_for(flow_run_id, lambda r: r.infrastructure_pid, "the VM", 300)
    assert not flow_run.state.is_running(), "the engine started too soon for this test"
    cli("flow-run", "cancel", flow_run_id)
    flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the cancellation", 120)
    assert flow_run.state.is_cancelled(), flow_run.state
    assert_nothing_left(vm_pool.pool)
    print(f"cancelled before the engine started: {flow_run.state.message}")


def test_a_stopped_guest_crashes_its_run_with_the_reason(vm_pool, vm_worker, localcloud,
                                                         assert_nothing_left):
    """The guest dies under a running flow (the local cloud's admin kills the instance; ARM
    keeps the VM, PowerState/stopped)."""
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    flow_run_id = _run_deployment(vm_pool("flows.py:sleeper", "sleeper-stopped"))
    name = _running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)[1]
    with LocalCloudAdmin.from_info(localcloud) as admin:
        admin.kill(name)
    flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
    assert flow_run.state.is_crashed(), flow_run.state
    assert f"VM {name} is stopped" in flow_run.state.message
    assert_nothing_left(vm_pool.pool)


def test_an_engine_that_dies_without_a_final_state_crashes_its_run(vm_pool, vm_worker,
                                                                   assert_nothing_left):
    """The engine process on the VM is SIGKILLed (as by the OOM killer): it reports nothing;
    the worker reads its exit status from the VM and crashes the run."""
    from prefect_azmanagers.azure import vm as azure_vm
    from prefect_azmanagers.detached.vm import ssh_connection

    flow_run_id = _run_deployment(vm_pool("flows.py:sleeper", "sleeper-killed"))
    group, name = _running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)
    # the python process only: the bash loop around it, whose command line also names
    # `flow-run execute`, reports its status
    kill = ("for p in $(pgrep -f 'prefect flow-run execute'); do "
            "[ \"$(cat /proc/$p/comm)\" = bash ] || kill -KILL $p; done")

    async def kill_engine(clients, manifest):
        vm = await azure_vm.get_vm(clients, group, name)
        async with ssh_connection(vm, manifest) as connection:
            return await connection.ssh.run(kill)

    done = _on_arm(kill_engine)
    assert done.exit_status == 0, done.stderr
    flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
    assert flow_run.state.is_crashed(), flow_run.state
    assert (f"the engine on VM {name} exited with status 137 without reporting a final state"
            in flow_run.state.message)
    assert_nothing_left(vm_pool.pool)


def test_a_run_that_does_not_start_within_boot_timeout_crashes(vm_pool, vm_worker,
                                                               assert_nothing_left):
    """The VM is up but the flow run never starts (the job's command stands in for an engine
    that hangs before reporting Running): boot_timeout crashes the run and deletes the VM."""
    flow_run_id = _run_deployment(vm_pool("flows.py:hello", "hello-hangs", command="sleep 900",
                                          boot_timeout=60))
    flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the crash", 240)
    assert flow_run.state.is_crashed(), flow_run.state
    name = flow_run.infrastructure_pid.split("/", 1)[1]
    assert (f"the flow run did not start on VM {name} within 60 s (boot_timeout)"
            in flow_run.state.message)
    assert_nothing_left(vm_pool.pool)


def test_keep_on_failure_keeps_a_failed_runs_vm_then_deletes_it(vm_pool, vm_worker, localcloud,
                                                                assert_nothing_left):
    from tests.worker.conftest import leftovers

    flow_run_id = _run_deployment(vm_pool("flows.py:fails", "fails-kept", keep_on_failure=45))
    flow_run = _wait_for(flow_run_id, lambda r: r.state.is_final(), "the failure", 300)
    assert flow_run.state.is_failed(), flow_run.state
    name = flow_run.infrastructure_pid.split("/", 1)[1]
    eventually(lambda: any(m.startswith(f"Keeping VM {name} (") for m in _messages(flow_run_id)),
               "the keep_on_failure message", 30)
    assert f"ARM VM {name}" in leftovers(localcloud, vm_pool.pool)  # kept, to debug
    assert_nothing_left(vm_pool.pool, timeout=120)


def test_the_runs_result_is_persisted_in_the_manifests_blob_container(vm_pool, vm_worker,
                                                                      assert_nothing_left):
    """The localcloud manifest names a blob container (Azurite): the VM's flow run gets it as
    its default result storage, so the result is read back here from Blob Storage."""
    from prefect.results import ResultRecordMetadata
    from prefect_azure import AzureBlobStorageContainer

    run = cli("deployment", "run", vm_pool("flows.py:persisted", "persisted"), "--watch",
              "--watch-timeout", "400", timeout=500, check=False)
    flow_run = _flow_run("persisted")
    assert run.returncode == 0 and flow_run.state.is_completed(), (
        run.stdout + "\n".join(_messages(flow_run.id)))
    container = AzureBlobStorageContainer.load("localcloud")
    record = flow_run.state.data
    assert isinstance(record, ResultRecordMetadata), record
    assert record.storage_block_id == container._block_document_id
    assert record.storage_key in container.list_blobs()
    vm_name = flow_run.infrastructure_pid.split("/", 1)[1]
    assert flow_run.state.result() == {"squares": [0, 1, 4, 9], "host": vm_name}
    assert_nothing_left(vm_pool.pool)
