"""MPI inside tasks: `comm()` is the communicator of the worker's ranks.

```python
from prefect import flow, task
from prefect_azmanagers import AzureScaleSetTaskRunner
from prefect_azmanagers.mpi import comm

@task
def total(x):
    c = comm()                      # every rank of the worker runs this task
    return c.allreduce(x * c.Get_rank())   # the task's result is rank 0's

@flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 2, mpi_ranks_per_worker=4))
def main():
    return total.submit(1).result()
```

Every rank runs each attempt of the task run (each retry; none when Prefect takes the result
from the cache) inside its TaskRunContext, so `get_run_logger()` logs to the task run on every
rank; the task run's states are reported by rank 0 alone.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
from typing import Any

from prefect_azmanagers.cluster.mpi import launched_by_mpi
from prefect_azmanagers.cluster.mpi.ranks import RankZero
from prefect_azmanagers.exceptions import ConfigurationError

__all__ = ["comm"]


def comm() -> Any:
    """mpi4py's COMM_WORLD of the worker running this task (one rank per MPI process).

    Raises ConfigurationError outside an MPI worker (the runner or cluster was created without
    `mpi_ranks_per_worker`) or when mpi4py is not installed on the instance.
    """
    if not launched_by_mpi():
        raise ConfigurationError(
            "prefect_azmanagers.mpi.comm() is only available in tasks running on MPI workers: "
            "create the task runner or cluster with mpi_ranks_per_worker=K (K >= 1).")
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigurationError(
            "mpi4py is not installed in the instance's Python: install prefect-azmanagers[mpi] "
            "there (and an MPI such as Debian's openmpi-bin).") from exc
    return MPI.COMM_WORLD


def checking_other_ranks(task: Any, ranks: RankZero | None) -> Any:
    """On rank 0 (`ranks`): a copy of the Prefect `task` whose function runs each attempt on
    every rank.

    Prefect's engine calls the function once per attempt (none when the result comes from the
    cache): the copy first starts the attempt on ranks > 0 with this task run's context, so
    they run the task function exactly as often as rank 0 and inside the same task run, and it
    ends by waiting for them, so a failure there becomes this attempt's failure (MPIRankError
    with that rank's traceback) in Prefect's state. Outside MPI the task itself.
    """
    if not launched_by_mpi():
        return task
    fn = task.fn

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def with_ranks_async(*args: Any, **kwargs: Any) -> Any:
            await asyncio.to_thread(ranks.begin_attempt, _attempt_context())
            try:
                result = await fn(*args, **kwargs)
            except BaseException:
                ranks.own_failure_stands()
                raise
            await asyncio.to_thread(ranks.wait_for_ranks)
            return result

        wrapper: Any = with_ranks_async
    else:
        @functools.wraps(fn)
        def with_ranks(*args: Any, **kwargs: Any) -> Any:
            ranks.begin_attempt(_attempt_context())
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                ranks.own_failure_stands()
                raise
            ranks.wait_for_ranks()
            return result

        wrapper = with_ranks
    checked = copy.copy(task)
    checked.fn = wrapper
    return checked


def _attempt_context() -> dict[str, Any]:
    """The running attempt's serialized TaskRunContext, without the task and its parameters
    (the ranks have both from the call's payload: large arguments are not sent again)."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:
        raise RuntimeError("checking_other_ranks' task function runs inside Prefect's task "
                           "engine only (no TaskRunContext is set)")
    serialized = context.model_copy(update={"parameters": {}}).serialize()
    for carried_by_the_payload in ("task", "parameters"):
        serialized.pop(carried_by_the_payload, None)
    return serialized


def run_task_function(task: Any, parameters: dict[str, Any], attempt: dict[str, Any],
                      client: Any) -> None:
    """On ranks > 0, inside the flow run's hydrated context: one attempt of the task's own
    function with its resolved parameters, in the TaskRunContext rank 0's engine announced
    (`attempt`), outside Prefect's task engine (rank 0 runs the engine, so the task run's
    states are reported once; `get_run_logger()` logs to the same task run)."""
    from prefect.context import hydrated_context
    from prefect.utilities.callables import parameters_to_args_kwargs
    from prefect.utilities.engine import resolve_inputs_sync

    resolved = resolve_inputs_sync(parameters)
    task_run = {**attempt, "task": task, "parameters": resolved}
    with hydrated_context({"task_run_context": task_run}, client=client):
        args, kwargs = parameters_to_args_kwargs(task.fn, resolved)
        result = task.fn(*args, **kwargs)
        if inspect.isawaitable(result):
            asyncio.run(result)
