"""MPI through AzureScaleSetTaskRunner on the local cloud: each task runs on all K ranks of a
worker, its result is rank 0's, a failing rank fails the task run (in Prefect's API too), and
every rank's output reaches the flow's log tagged with its rank."""

from __future__ import annotations

import time
import uuid

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from prefect_azmanagers.cluster.mpi import MPIRankError
from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
RANKS = 3


@task
def weighted_sum(weight: int) -> int:
    from prefect_azmanagers.mpi import comm

    c = comm()
    print(f"rank {c.Get_rank()} of {c.Get_size()} contributes {weight * c.Get_rank()}")
    return c.allreduce(weight * c.Get_rank())


@task
def fails_on_last_rank() -> int:
    from prefect_azmanagers.mpi import comm

    c = comm()
    total = c.allreduce(1)
    if c.Get_rank() == c.Get_size() - 1:
        raise ArithmeticError("the last rank cannot count")
    return total


def logs_of(flow_run_id, wait_for: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        messages = [log.message for log in logs]
        if any(wait_for in m for m in messages) or time.monotonic() > deadline:
            return messages


def test_mpi_tasks_through_the_task_runner(localcloud):
    group = f"mpitr-{uuid.uuid4().hex[:6]}"

    @flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 1, manifest="localcloud",
                                              group=group, mpi_ranks_per_worker=RANKS,
                                              join_timeout=600))
    def mpi_flow():
        good = [weighted_sum.submit(w) for w in (1, 10)]
        bad = fails_on_last_rank.submit()
        bad.wait()
        return [f.result() for f in good], bad.state

    state = mpi_flow(return_state=True)
    sums, bad_state = state.result()
    assert sums == [0 + 1 + 2, 0 + 10 + 20]
    assert bad_state.is_failed()
    with pytest.raises(MPIRankError) as info:
        bad_state.result()
    assert info.value.rank == RANKS - 1 and "the last rank cannot count" in str(info.value)

    messages = logs_of(state.state_details.flow_run_id, wait_for=f"[rank {RANKS - 1}] rank")
    for rank in range(RANKS):
        assert any(f"[rank {rank}] rank {rank} of {RANKS} contributes" in m for m in messages), messages
