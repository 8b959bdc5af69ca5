"""prefect-azmanagers: AzManagers.jl's capabilities as a Prefect integration.

```python
from prefect import flow, task
from prefect_azmanagers import AzureScaleSetTaskRunner

@task
def square(x):
    return x * x

@flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 4))   # addprocs("cbox", 4)
def sweep():
    return sum(f.result() for f in square.map(range(100)))
```

Names are resolved lazily so that `import prefect_azmanagers` stays cheap (the agent on each
instance imports only what it uses).
"""

from __future__ import annotations

from prefect_azmanagers._lazy import lazy_exports

__version__ = "0.1.0"

# Prefect finds the block classes through the `prefect.collections` entry point, which names
# `prefect_azmanagers.blocks` (not this package): the agent on each instance imports this package
# and must not pay for importing prefect unless the work it runs needs it.

_EXPORTS = {
    "AzureManifest": "blocks",
    "ScaleSetTemplate": "blocks",
    "VMTemplate": "blocks",
    "NICTemplate": "blocks",
    "build_sstemplate": "templates",
    "build_vmtemplate": "templates",
    "build_nictemplate": "templates",
    "AzureCluster": "cluster.cluster",
    "Adapt": "cluster.adapt",
    "AzureScaleSetTaskRunner": "task_runner",
    "addproc": "detached",
    "rmproc": "detached",
    "detachat": "detached",
    "detach": "detached",
    "DetachedJob": "detached",
    "DetachedVM": "detached",
    "variablebundle": "detached",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
