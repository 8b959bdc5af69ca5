"""Task runs that the engine, not the task, ends, as the Prefect API shows them: end to end on
local-cloud workers (real ARM SDK, OpenSSH, agents) against a real Prefect server.

No worker reports these outcomes (its agent died, or the task run could not even be rebuilt
there), so the runner records them; the tests read them back with the Prefect client only.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.futures import wait

from prefect_azmanagers.exceptions import WorkerLost

from .tasks import square
from .test_runner_e2e import assert_nothing_left, new_group, runner

pytestmark = pytest.mark.e2e


@task
def dies_with_its_worker():
    """Kills its agent once the API holds this task run as Running (so the runner has a
    Running state to replace, not a missing task run to create)."""
    from prefect.runtime import task_run

    while not (state := _recorded_state(task_run.id)) or not state.is_running():
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)


def _recorded_state(task_run_id):
    with get_client(sync_client=True) as client:
        try:
            return client.read_task_run(task_run_id).state
        except ObjectNotFound:
            return None


class TiedToItsProcess:
    """A handle valid only in the process that made it (as an open descriptor or a mapped
    segment would be): it pickles, but cannot be rebuilt in any other process."""

    def __init__(self, pid: int):
        self.pid = pid

    def __reduce__(self):
        return (_reattach, (self.pid,))


def _reattach(pid: int) -> TiedToItsProcess:
    if os.getpid() != pid:
        raise ProcessLookupError(f"the handle of process {pid} cannot be reattached in "
                                 f"process {os.getpid()}")
    return TiedToItsProcess(pid)


@task
def describe(handle):
    return repr(handle)


def final_state_in_api(task_run_id, timeout: float = 30):
    """The task run's state once it is final in the API (worker events land asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        state = _recorded_state(task_run_id)
        if (state is not None and state.is_final()) or time.monotonic() > deadline:
            return state
        time.sleep(0.3)


def test_lost_and_unrebuildable_task_runs_are_crashed_and_failed_in_the_api(localcloud, admin):
    group, tag = new_group("tre"), uuid.uuid4().hex
    ids: dict[str, uuid.UUID] = {}

    @flow(task_runner=runner(group, 1, ppi=2, max_task_retries_on_lost_worker=0,
                             env={"AZM_TEST_TAG": tag}))
    def mixed():
        ids["flow_run"] = FlowRunContext.get().flow_run.id
        fine = square.submit(7)
        unrebuildable = describe.submit(TiedToItsProcess(os.getpid()))
        lost = dies_with_its_worker.submit()
        ids.update(fine=fine.task_run_id, unrebuildable=unrebuildable.task_run_id,
                   lost=lost.task_run_id)
        wait([fine, unrebuildable, lost])
        assert fine.result() == 49
        return lost.result()  # raises: the flow fails with the lost worker

    state = mixed(return_state=True)
    assert state.is_failed()
    with pytest.raises(WorkerLost):
        state.result()

    lost = final_state_in_api(ids["lost"])
    assert lost is not None and lost.type == StateType.CRASHED, lost
    assert "was lost while running it" in lost.message
    assert f"(instance {group}_" in lost.message  # names the worker's instance
    assert "max_task_retries_on_lost_worker=0" in lost.message
    with get_client(sync_client=True) as client:
        history = {s.type for s in client.read_task_run_states(ids["lost"])}
    assert StateType.RUNNING in history  # the worker's Running state, replaced by the runner

    unrebuildable = final_state_in_api(ids["unrebuildable"])
    assert unrebuildable is not None and unrebuildable.type == StateType.FAILED, unrebuildable
    assert ("Parameter 'handle' of task 'describe' was pickled on the driver but cannot be "
            "unpickled on the worker") in unrebuildable.message
    assert "ProcessLookupError: the handle of process" in unrebuildable.message

    fine = final_state_in_api(ids["fine"])
    assert fine is not None and fine.type == StateType.COMPLETED, fine

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(ids["flow_run"])
    assert flow_run.state.type == StateType.FAILED
    assert_nothing_left(admin, group, tag)


def test_task_runs_queued_when_provisioning_fails_are_crashed_in_the_api(localcloud, admin):
    group, tag = new_group("tra"), uuid.uuid4().hex
    messages: dict[uuid.UUID, str] = {}
    admin.fail_next_lro(1)  # the scale set's creation ends AllocationFailed: no worker comes
    try:
        @flow(task_runner=runner(group, 1, env={"AZM_TEST_TAG": tag}))
        def stranded():
            futures = square.map(range(3))
            wait(futures)
            messages.update((f.task_run_id, f.state.message) for f in futures)
            return futures.result()

        state = stranded(return_state=True)
    finally:
        admin.clear_faults()
    assert state.is_failed()
    assert len(messages) == 3
    for task_run_id, message in messages.items():
        recorded = final_state_in_api(task_run_id)
        assert recorded is not None and recorded.type == StateType.CRASHED, recorded
        assert recorded.message == message  # the engine's reason, as the flow saw it
        assert "no worker is left to run it and none is coming" in message
    assert_nothing_left(admin, group, tag)
