"""The azure-vm worker end to end: a VM lost under its run (deleted, evicted, failed to boot,
stopped, its engine killed, not started in time) ends the run Crashed with the reason and
leaves nothing (keep_on_failure keeps it for a while first)."""

from __future__ import annotations

import pytest

from tests.worker.conftest import eventually
from tests.worker.runs import (
    messages_of,
    on_arm,
    run_deployment,
    running_on_vm,
    wait_for_run,
)

pytestmark = pytest.mark.e2e


def test_a_vm_deleted_under_a_running_flow_makes_it_crashed(vm_pool, vm_worker, localcloud,
                                                            assert_nothing_left):
    from prefect_azmanagers.azure import vm as azure_vm

    flow_run_id = run_deployment(vm_pool("flows.py:sleeper", "sleeper"))
    group, name = running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)
    vm = on_arm(lambda clients, _: azure_vm.get_vm(clients, group, name))
    assert vm.tags["azmanagers-flow-run"] == flow_run_id      # the run's id in the VM's tags
    assert vm.tags["azmanagers-work-pool"] == vm_pool.pool
    assert vm.tags["azmanagers-kind"] == "azure-vm"
    on_arm(lambda clients, _: azure_vm.delete_vm(clients, group, name))  # as in the portal
    flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
    assert flow_run.state.is_crashed(), flow_run.state
    assert f"VM {name} no longer exists" in flow_run.state.message
    assert_nothing_left(vm_pool.pool)


def test_a_spot_eviction_mid_run_ends_crashed_with_the_reason(vm_pool, vm_worker, localcloud,
                                                              assert_nothing_left):
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    flow_run_id = run_deployment(vm_pool("flows.py:sleeper", "spot-sleeper", spot=True))
    group, name = running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)

    with LocalCloudAdmin.from_info(localcloud) as admin:
        notice = admin.status()["settings"]["eviction_notice"]
        admin.settings(eviction_notice=3)
        try:
            on_arm(lambda clients, _: clients.compute.virtual_machines.simulate_eviction(
                group, name))
            flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
        finally:
            admin.settings(eviction_notice=notice)
    assert flow_run.state.is_crashed(), flow_run.state
    assert f"VM {name} no longer exists (evicted or deleted)" in flow_run.state.message
    assert_nothing_left(vm_pool.pool)


def test_a_vm_that_fails_to_boot_crashes_the_run_and_leaves_nothing(vm_pool, vm_worker,
                                                                     localcloud,
                                                                     assert_nothing_left):
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    deployment = vm_pool("flows.py:hello", "hello-bootfail")
    with LocalCloudAdmin.from_info(localcloud) as admin:
        admin.boot_fail(1)
        try:
            flow_run_id = run_deployment(deployment)
            flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
        finally:
            admin.clear_faults()
    assert flow_run.state.is_crashed(), flow_run.state
    assert "boot failure injected" in flow_run.state.message
    assert_nothing_left(vm_pool.pool)


def test_a_stopped_guest_crashes_its_run_with_the_reason(vm_pool, vm_worker, localcloud,
                                                         assert_nothing_left):
    """The guest dies under a running flow (the local cloud's admin kills the instance; ARM
    keeps the VM, PowerState/stopped)."""
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    flow_run_id = run_deployment(vm_pool("flows.py:sleeper", "sleeper-stopped"))
    name = running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)[1]
    with LocalCloudAdmin.from_info(localcloud) as admin:
        admin.kill(name)
    flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
    assert flow_run.state.is_crashed(), flow_run.state
    assert f"VM {name} is stopped" in flow_run.state.message
    assert_nothing_left(vm_pool.pool)


def test_an_engine_that_dies_without_a_final_state_crashes_its_run(vm_pool, vm_worker,
                                                                   assert_nothing_left):
    """The engine process on the VM is SIGKILLed (as by the OOM killer): it reports nothing;
    the worker reads its exit status from the VM and crashes the run."""
    from prefect_azmanagers.azure import vm as azure_vm
    from prefect_azmanagers.detached.vm import ssh_connection

    flow_run_id = run_deployment(vm_pool("flows.py:sleeper", "sleeper-killed"))
    group, name = running_on_vm(flow_run_id).infrastructure_pid.split("/", 1)
    # the python process of this run only (the local cloud's instances share the host's
    # processes, other tests' engines among them): the bash loop around it, whose command
    # line also names `flow-run execute`, reports its status
    kill = (f"for p in $(pgrep -f 'prefect flow-run execute {flow_run_id}'); do "
            "[ \"$(cat /proc/$p/comm)\" = bash ] || kill -KILL $p; done")

    async def kill_engine(clients, manifest):
        vm = await azure_vm.get_vm(clients, group, name)
        async with ssh_connection(vm, manifest) as connection:
            return await connection.ssh.run(kill)

    done = on_arm(kill_engine)
    assert done.exit_status == 0, done.stderr
    flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the crash", 120)
    assert flow_run.state.is_crashed(), flow_run.state
    assert (f"the engine on VM {name} exited with status 137 without reporting a final state"
            in flow_run.state.message)
    assert_nothing_left(vm_pool.pool)


def test_a_run_that_does_not_start_within_boot_timeout_crashes(vm_pool, vm_worker,
                                                               assert_nothing_left):
    """The VM is up but the flow run never starts (the job's command stands in for an engine
    that hangs before reporting Running): boot_timeout crashes the run and deletes the VM."""
    flow_run_id = run_deployment(vm_pool("flows.py:hello", "hello-hangs", command="sleep 900",
                                          boot_timeout=30))
    flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the crash", 240)
    assert flow_run.state.is_crashed(), flow_run.state
    name = flow_run.infrastructure_pid.split("/", 1)[1]
    assert (f"the flow run did not start on VM {name} within 30 s (boot_timeout)"
            in flow_run.state.message)
    assert_nothing_left(vm_pool.pool)


def test_keep_on_failure_keeps_a_failed_runs_vm_then_deletes_it(vm_pool, vm_worker, localcloud,
                                                                assert_nothing_left):
    from tests.worker.conftest import leftovers

    flow_run_id = run_deployment(vm_pool("flows.py:fails", "fails-kept", keep_on_failure=20))
    flow_run = wait_for_run(flow_run_id, lambda r: r.state.is_final(), "the failure", 300)
    assert flow_run.state.is_failed(), flow_run.state
    name = flow_run.infrastructure_pid.split("/", 1)[1]
    eventually(lambda: any(m.startswith(f"Keeping VM {name} (") for m in messages_of(flow_run_id)),
               "the keep_on_failure message", 30)
    assert f"ARM VM {name}" in leftovers(localcloud, vm_pool.pool)  # kept, to debug
    assert_nothing_left(vm_pool.pool, timeout=120)
