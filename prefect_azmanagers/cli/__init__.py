"""`prefect-azmanagers`: the command line, one typer app per noun (as Prefect's own CLI).

```
prefect-azmanagers manifest write --subscription-id SUB --resource-group my-rg --ssh-user cvx
prefect-azmanagers import-azmanagers            # ~/.azmanagers/*.json -> Prefect blocks
prefect-azmanagers localcloud start --background
prefect-azmanagers --verbose scalesets list     # --verbose logs every ARM request
prefect-azmanagers detached add localcloud-vm --manifest localcloud   # a detached VM
```

A user mistake (any `AzManagersError`) prints one red line and exits 1, never a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

import typer
from typer.core import TyperGroup

from prefect_azmanagers.cli import azure, config, detached, localcloud
from prefect_azmanagers.cli.common import exit_with_error
from prefect_azmanagers.exceptions import AzManagersError


class _ErrorHandlingGroup(TyperGroup):
    """Turns the project's errors raised by any sub-command into `exit_with_error`."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except AzManagersError as exc:
            exit_with_error(str(exc))


app = typer.Typer(
    name="prefect-azmanagers",
    cls=_ErrorHandlingGroup,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="AzManagers for Prefect: manifests, templates, scale sets, detached VMs, local cloud.",
)


@app.callback()
def _root(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log DEBUG messages of prefect_azmanagers (each ARM request)."
    ),
) -> None:
    if verbose:
        logger = logging.getLogger("prefect_azmanagers")
        logger.setLevel(logging.DEBUG)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            logger.addHandler(handler)


app.add_typer(config.manifest_app, name="manifest")
app.add_typer(config.template_app, name="template")
app.command("import-azmanagers")(config.import_azmanagers)
app.command("export-azmanagers")(config.export_azmanagers)
app.command("keygen")(config.keygen)
app.add_typer(localcloud.app, name="localcloud")
app.add_typer(azure.scalesets_app, name="scalesets")
app.add_typer(azure.vms_app, name="vms")  # what ARM lists; `detached` manages detached VMs
app.command("cleanup")(azure.cleanup)
app.command("usage")(azure.usage)
app.add_typer(detached.vm_app, name="detached")
app.add_typer(detached.vm_app, name="vm", hidden=True)  # the former name, easily taken for `vms`
app.add_typer(detached.job_app, name="job")
