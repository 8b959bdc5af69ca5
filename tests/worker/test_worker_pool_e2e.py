"""The azure-vm worker end to end: a worker killed mid-run and restarted finishes or cleans up
its VMs; the pool's concurrency limit bounds the VMs."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.worker.conftest import cli
from tests.worker.runs import messages_of, run_deployment, running_on_vm, wait_for_run

pytestmark = pytest.mark.e2e


def test_a_killed_worker_restarted_mid_run_leaves_nothing_behind(vm_pool, tmp_path,
                                                                 assert_nothing_left):
    import signal

    from tests.worker.conftest import WorkerProcess, eventually

    # This module's first test: the module's shared worker (`vm_worker`) is not running yet,
    # so this test's two workers are the pool's only ones.
    # The flow runs until this file exists (the VMs see the host's /var/tmp), so it is still
    # running when the second worker adopts its VM, however slow the machine.
    release = Path(tempfile.mkdtemp(prefix="azm-release-", dir="/var/tmp"))
    release.chmod(0o755)
    deployment = vm_pool("flows.py:sleeper", "released-sleeper",
                         parameters={"seconds": 600, "release": str(release / "go")})
    first = WorkerProcess(vm_pool.pool, tmp_path / "first.log")
    first.start()
    try:
        flow_run_id = run_deployment(deployment)
        vm_name = running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)[1]
    finally:
        first.stop(signal.SIGKILL)   # no cleanup at all: the VM keeps running the flow
    second = WorkerProcess(vm_pool.pool, tmp_path / "second.log")
    second.start()
    try:
        eventually(lambda: f"adopts VM {vm_name}" in "\n".join(messages_of(flow_run_id)),
                   "the second worker's adoption of the VM", 120)
        (release / "go").touch()
        flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the run's end", 300)
        assert flow_run.state.is_completed(), flow_run.state
        assert_nothing_left(vm_pool.pool, timeout=120)
    finally:
        second.stop()
        shutil.rmtree(release, ignore_errors=True)


def test_a_pool_concurrency_limit_of_2_bounds_the_vms(vm_pool, vm_worker, localcloud,
                                                      assert_nothing_left):
    from prefect import get_client

    from tests.worker.conftest import leftovers

    cli("work-pool", "set-concurrency-limit", vm_pool.pool, "2")
    deployment = vm_pool("flows.py:hello", "hello-many")
    flow_run_ids = [run_deployment(deployment) for _ in range(4)]
    most, deadline = 0, time.monotonic() + 900
    with get_client(sync_client=True) as client:
        while not all(client.read_flow_run(i).state.is_final() for i in flow_run_ids):
            assert time.monotonic() < deadline, "the 4 runs did not end"
            vms = [x for x in leftovers(localcloud, vm_pool.pool) if x.startswith("ARM VM ")]
            most = max(most, len(vms))
            assert most <= 2, vms
            time.sleep(0.5)
        assert all(client.read_flow_run(i).state.is_completed() for i in flow_run_ids)
    assert most == 2, f"the 4 runs never had 2 VMs at once (at most {most}): the limit was not used"
    assert_nothing_left(vm_pool.pool)
