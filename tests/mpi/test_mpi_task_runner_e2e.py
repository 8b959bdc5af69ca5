"""MPI through AzureScaleSetTaskRunner on the local cloud, one flow run for the whole module:
each task runs on all K ranks of a worker, its result is rank 0's, a failing rank fails the task
run (in Prefect's API too), every rank's output reaches the flow's log tagged with its rank, and
ranks > 0 run each attempt rank 0's engine makes (none for a cached result) inside the same
task run (their `get_run_logger()` lines are that task run's logs)."""

from __future__ import annotations

import time
import uuid

import pytest
from prefect import flow, task
from prefect.cache_policies import INPUTS
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTaskRunId

from prefect_azmanagers.exceptions import MPIRankError
from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
RANKS = 3
TASK_WAIT = 120  # a task whose ranks got out of step hangs: fail the test instead


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


def _first_attempt_fails_on_rank0(name: str) -> int:
    from prefect import get_run_logger
    from prefect.context import TaskRunContext

    from prefect_azmanagers.mpi import comm

    c = comm()
    run = TaskRunContext.get()
    attempt = run.task_run.run_count if run else None
    get_run_logger().info(f"{name}: rank {c.Get_rank()} runs attempt {attempt} of task run "
                          f"{run.task_run.id if run else None}")
    total = c.allreduce(1)  # needs every rank in the same attempt
    if c.Get_rank() == 0 and attempt == 1:
        raise RuntimeError("the first attempt fails on rank 0")
    return total


@task(retries=1, retry_delay_seconds=0)
def retried_sync() -> int:
    return _first_attempt_fails_on_rank0("retried_sync")


@task(retries=1, retry_delay_seconds=0)
async def retried_async() -> int:
    return _first_attempt_fails_on_rank0("retried_async")


@task(cache_policy=INPUTS, persist_result=True)
def cached_sum(x: int) -> int:
    from prefect_azmanagers.mpi import comm

    c = comm()
    print(f"cached_sum body on rank {c.Get_rank()} for {x}")
    return c.allreduce(x)


def settled(future):
    future.wait(TASK_WAIT)
    return future.state


@pytest.fixture(scope="module")
def mpi_run(localcloud):
    """The flow run's id and what it returned (states, the retried task runs' ids)."""
    group = f"mpitr-{uuid.uuid4().hex[:6]}"

    @flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 1, manifest="localcloud",
                                              group=group, mpi_ranks_per_worker=RANKS,
                                              join_timeout=600))
    def mpi_flow():
        good = [weighted_sum.submit(w) for w in (1, 10)]
        bad = fails_on_last_rank.submit()
        retried = {t.name: t.submit() for t in (retried_sync, retried_async)}
        computed = settled(cached_sum.submit(4))
        return {"sums": [f.result() for f in good], "bad": settled(bad),
                "retried": {name: (settled(f), f.task_run_id) for name, f in retried.items()},
                "computed": computed, "cached": settled(cached_sum.submit(4))}

    state = mpi_flow(return_state=True)
    return state.state_details.flow_run_id, state.result()


def read_logs(log_filter: LogFilter, wait_for: str, timeout: float = 30) -> list:
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter)
        if any(wait_for in log.message for log in logs) or time.monotonic() > deadline:
            return logs


def flow_log(flow_run_id, wait_for: str) -> list[str]:
    logs = read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), wait_for)
    return [log.message for log in logs]


def test_results_rank_failures_and_tagged_output(mpi_run):
    flow_run_id, returned = mpi_run
    assert returned["sums"] == [0 + 1 + 2, 0 + 10 + 20]
    assert returned["bad"].is_failed()
    with pytest.raises(MPIRankError) as info:
        returned["bad"].result()
    assert info.value.rank == RANKS - 1 and "the last rank cannot count" in str(info.value)

    messages = flow_log(flow_run_id, wait_for=f"[rank {RANKS - 1}] rank")
    for rank in range(RANKS):
        assert any(f"[rank {rank}] rank {rank} of {RANKS} contributes" in m for m in messages), messages


@pytest.mark.parametrize("name", ["retried_sync", "retried_async"])
def test_every_rank_runs_each_retry_in_the_task_run(mpi_run, name):
    """retries=1, the first attempt failing on rank 0: every rank runs both attempts, in the
    task run's context (their run logger writes to it), and the task run ends Completed."""
    retried, task_run_id = mpi_run[1]["retried"][name]
    assert retried.is_completed(), retried
    assert retried.result() == RANKS

    logs = read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])),
                     wait_for=f"rank {RANKS - 1} runs attempt 2")
    ran = sorted(log.message for log in logs if " runs attempt " in log.message)
    assert ran == sorted(f"{name}: rank {rank} runs attempt {attempt} of task run {task_run_id}"
                         for rank in range(RANKS) for attempt in (1, 2)), ran


def test_a_cached_result_runs_no_rank(mpi_run):
    flow_run_id, returned = mpi_run
    computed, cached = returned["computed"], returned["cached"]
    assert computed.name == "Completed" and computed.result() == 4 * RANKS
    assert cached.name == "Cached" and cached.result() == 4 * RANKS

    messages = flow_log(flow_run_id, wait_for=f"[rank {RANKS - 1}] cached_sum body")
    for rank in range(RANKS):
        body_ran = [m for m in messages if f"[rank {rank}] cached_sum body on rank {rank}" in m]
        assert len(body_ran) == 1, messages  # the first call only
