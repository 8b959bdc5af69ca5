"""The data plane: remote execution of cloudpickled callables on scale-set instances over SSH.

`AzureCluster` is the engine (cluster.py); protocol.py, transport.py and agent.py are its wire
format, SSH layer and worker process. Names are loaded lazily so that the agent, which imports
`prefect_azmanagers.cluster.agent` on every instance, pulls in none of the Azure SDK.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AzureCluster": "cluster",
    "WorkerInfo": "cluster",
    "WorkerState": "cluster",
    "DEFAULT_MPI_FLAGS": "cluster",
    "RemoteError": "errors",
    "register_flush_hook": "agent",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'prefect_azmanagers.cluster' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"prefect_azmanagers.cluster.{module}"), name)
    globals()[name] = value
    return value
