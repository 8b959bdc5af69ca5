"""MPI ranks per worker, the driver's side: the launcher command.

With `mpi_ranks_per_worker=K` a worker is `mpirun -n K <flags> <python> -m
prefect_azmanagers.cluster.agent ...` (see `launcher`). The rank side lives in this package's
other modules, imported only by the agent under mpirun:

- `ranks`: what every rank shares: the control messages, polling, `[rank r]` output tagging,
  and the `RankedCall` seam through which a call runs its attempts on every rank;
- `leader`: rank 0, the agent the driver talks to (Open MPI gives it mpirun's stdin/stdout);
- `follower`: ranks > 0, which run what rank 0 sends and never write to stdout.
"""

from __future__ import annotations

import os
import shlex

from prefect_azmanagers.exceptions import ConfigurationError

__all__ = ["DEFAULT_MPI_FLAGS", "launched_by_mpi", "launcher"]

# Portable for Open MPI (Debian's MPI): K ranks may exceed the instance's cores (the original's
# `-bind-to core:$OMP_NUM_THREADS --map-by numa` assumes whole-machine HPC sizes).
DEFAULT_MPI_FLAGS = "--bind-to none --oversubscribe"


def launcher(ranks: int, flags: str = DEFAULT_MPI_FLAGS) -> list[str]:
    """The words that prefix the agent command to start `ranks` ranks (transport.agent_command)."""
    if ranks < 1:
        raise ConfigurationError(f"mpi_ranks_per_worker must be at least 1 to use MPI, got {ranks}.")
    try:
        extra = shlex.split(flags)
    except ValueError as exc:
        raise ConfigurationError(f"mpi_flags {flags!r} is not a valid shell word list: {exc}") from exc
    return ["mpirun", "-n", str(ranks), *extra]


def launched_by_mpi() -> bool:
    """True in a process started by mpirun/mpiexec (Open MPI or a PMI-based launcher)."""
    return any(name in os.environ for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
