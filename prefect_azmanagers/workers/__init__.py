"""Prefect work-pool types of prefect-azmanagers (registered through `prefect.collections`).

`azure_vm` holds the `azure-vm` worker as Prefect sees it (job variables, the BaseWorker
subclass); `vmrun` the life of one flow run's VM. Only `azure_vm` is imported when Prefect
loads collections, so every `prefect` command stays cheap: the Azure SDK, asyncssh and the
rest come with `vmrun`, when a worker first runs or kills something.
"""
