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
"""

from __future__ import annotations

from typing import Any

from prefect_azmanagers.cluster.mpi import launched_by_mpi
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
