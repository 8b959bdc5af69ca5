"""The local cloud's resources and their state machines, without HTTP (moto's `ec2/models/`).

`Backend` owns scale sets, VMs (a Uniform scale set's instances, Flexible members and standalone
VMs), NICs and long-running operations; one part per resource, each a mixin over `BackendBase`
(the tables, their Store and the injected `SandboxHost`):

- resources.py   the records (ScaleSet, Instance, Nic, Operation, Faults) and ARM id prefixes
- base.py        state, persistence, background tasks
- operations.py  long-running operations, request counters, injected request faults
- quotas.py      usage and quota/SKU checks
- instances.py   what every VM goes through: boot into a sandbox, removal, guest faults, IMDS
- scalesets.py   scale sets and their members;  vms.py  standalone VMs;  nics.py  NICs
- evictions.py   Spot eviction (scheduled event, then delete or deallocate)

Every instance is a sandbox keyed by its vmId. Quotas, SKUs and injected faults are checked
here, so the HTTP layer (responses.py) only parses, validates shapes and serializes. Records
persist in the Store; after a restart the sandboxes are gone, so instances come back deallocated
(their ARM resources stay, which is what a user's cleanup after a crash needs).
"""

from prefect_azmanagers.localcloud.models.evictions import Evictions
from prefect_azmanagers.localcloud.models.instances import check_custom_data
from prefect_azmanagers.localcloud.models.resources import Instance, Nic, Operation, ScaleSet
from prefect_azmanagers.localcloud.models.scalesets import ScaleSets
from prefect_azmanagers.localcloud.models.vms import Vms


class Backend(ScaleSets, Vms, Evictions):
    """All resources of one local cloud and what happens to them."""


__all__ = ["Backend", "Instance", "Nic", "Operation", "ScaleSet", "check_custom_data"]
