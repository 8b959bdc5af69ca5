"""The data plane: remote execution of cloudpickled callables on scale-set instances over SSH.

`AzureCluster` is the engine (cluster.py); protocol.py, transport.py and agent.py are its wire
format, SSH layer and worker process. Names are loaded lazily so that the agent, which imports
`prefect_azmanagers.cluster.agent` on every instance, pulls in none of the Azure SDK.
"""

from __future__ import annotations

from prefect_azmanagers._lazy import lazy_exports

_EXPORTS = {
    "AzureCluster": "cluster",
    "Adapt": "adapt",
    "WorkerInfo": "cluster",
    "WorkerState": "cluster",
    "ClusterOptions": "options",
    "DEFAULT_MPI_FLAGS": "mpi",
    "RemoteError": "errors",
    "register_flush_hook": "agent",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
