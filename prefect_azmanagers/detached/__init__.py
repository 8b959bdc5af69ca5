"""Detached runs: long jobs on a dedicated VM, as Prefect flow runs executed by a worker there.

```python
from prefect_azmanagers import addproc, detachat, detach, rmproc, variablebundle

vm = addproc("localcloud-vm")                      # a VM whose Prefect worker polls pool vm.work_pool
variablebundle.update(scale=3)

def job(n):
    from prefect_azmanagers import variablebundle
    print("hello from the VM")
    return n * variablebundle["scale"]

j = detachat(vm, job, 14)                          # returns at once; the laptop may close now
j.wait(); print(j.read(), j.status(), j.result())  # "hello from the VM\n" done 42
rmproc(vm)                                         # VM, NIC, work pool and deployment gone

detach(job, 1, vm_template="localcloud-vm", persist=False)   # the VM is deleted when the job ends
```

Names are resolved lazily, so the job process on the VM (`jobprocess`) imports nothing heavy.
"""

from __future__ import annotations

from prefect_azmanagers._lazy import lazy_exports

_EXPORTS = {
    "variablebundle": "bundle",
    "DetachedVM": "vm",
    "addproc": "vm",
    "rmproc": "vm",
    "list_detached_vms": "vm",
    "DetachedJob": "job",
    "detachat": "job",
    "detach": "detach",
    "DetachedJobFailed": "runtime",
    "run_detached": "runtime",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
