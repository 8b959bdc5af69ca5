"""`prefect-azmanagers`: the command line, one typer app per noun (as Prefect's own CLI).

```
prefect-azmanagers manifest write --subscription-id SUB --resource-group my-rg --ssh-user cvx
prefect-azmanagers import-azmanagers            # ~/.azmanagers/*.json -> Prefect blocks
prefect-azmanagers localcloud start --background
prefect-azmanagers --verbose scalesets list     # --verbose logs every ARM request
prefect-azmanagers detached add localcloud-vm --manifest localcloud   # a detached VM
```

A user mistake (any `AzManagersError`) prints one red line and exits 1, never a traceback.
A noun's module is imported when the noun is used: `localcloud stop` never imports Prefect or
the Azure SDK (3 s of imports before), only the top-level `--help` imports every noun.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import click
import typer
from typer.core import TyperGroup

from prefect_azmanagers.cli.common import exit_with_error
from prefect_azmanagers.exceptions import AzManagersError

# command -> (module of prefect_azmanagers.cli, its Typer app or command function), in help order
_COMMANDS = {
    "manifest": ("config", "manifest_app"),
    "template": ("config", "template_app"),
    "import-azmanagers": ("config", "import_azmanagers"),
    "export-azmanagers": ("config", "export_azmanagers"),
    "keygen": ("config", "keygen"),
    "localcloud": ("localcloud", "app"),
    "scalesets": ("azure", "scalesets_app"),
    "vms": ("azure", "vms_app"),  # what ARM lists; `detached` manages detached VMs
    "cleanup": ("azure", "cleanup"),
    "usage": ("azure", "usage"),
    "detached": ("detached", "vm_app"),
    "vm": ("detached", "vm_app"),  # the former name of `detached`, easily taken for `vms`
    "job": ("detached", "job_app"),
}
_HIDDEN = {"vm"}


class _RootGroup(TyperGroup):
    """Imports a command's module when the command is looked up, and turns the project's errors
    raised by any sub-command into `exit_with_error`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *_COMMANDS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return super().get_command(ctx, name)
        module, attribute = _COMMANDS[name]
        target = getattr(importlib.import_module(f"prefect_azmanagers.cli.{module}"), attribute)
        if isinstance(target, typer.Typer):
            command = typer.main.get_group(target)  # a group even with one command (`vms list`)
        else:
            single = typer.Typer()
            single.command(name)(target)
            command = typer.main.get_command(single)
        command.name, command.hidden = name, name in _HIDDEN
        return command

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except AzManagersError as exc:
            exit_with_error(str(exc))


app = typer.Typer(
    name="prefect-azmanagers",
    cls=_RootGroup,
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
