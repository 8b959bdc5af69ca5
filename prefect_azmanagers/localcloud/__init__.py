"""The local cloud: an ARM-compatible endpoint whose VMs are local sandboxes reached over SSH.

```python
from prefect_azmanagers.localcloud import start, stop, LocalCloudAdmin

info = start("~/.azmanagers/localcloud")          # background; returns localcloud.json
# ComputeManagementClient(cred, info["subscription_id"], base_url=info["arm_endpoint"],
#                         connection_verify=info["ca_cert"])
LocalCloudAdmin.from_info(info).throttle(2)       # faults, settings, counters
stop("~/.azmanagers/localcloud")                  # every instance and process removed
```
Layout (moto-style): models/ (resources and state machines, one part per resource),
responses.py (ARM HTTP layer), urls.py (routing), exceptions.py (ARM errors), config.py, store.py,
server.py (lifecycle), admin.py (fault injection), and the VM sandboxes: sandbox/ (the host and its
isolated/loopback network modes) and its helpers.
"""

from prefect_azmanagers.localcloud.admin import AdminError, LocalCloudAdmin
from prefect_azmanagers.localcloud.server import DEFAULT_STATE_DIR, LocalCloudError, start, stop

__all__ = ["AdminError", "DEFAULT_STATE_DIR", "LocalCloudAdmin", "LocalCloudError", "start", "stop"]
