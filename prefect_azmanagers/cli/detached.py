"""`prefect-azmanagers vm|job ...`: detached VMs and the jobs running on them.

```
prefect-azmanagers detached add localcloud-vm --manifest localcloud --name analysis-1 --code flows
prefect-azmanagers detached list --manifest localcloud
prefect deployment run azmanagers-detached/analysis-1 ...   # or flows of prefect.yaml
prefect-azmanagers job status 0691e3c1-...                  # starting|running|done|failed|cancelled
prefect-azmanagers job logs 0691e3c1-... --stderr
prefect-azmanagers job wait 0691e3c1-... --timeout 600      # exit code 1 unless done
prefect-azmanagers job kill 0691e3c1-...
prefect-azmanagers detached rm analysis-1 --manifest localcloud
```
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from prefect_azmanagers.cli.common import MANIFEST_OPTION, exit_with_error

if TYPE_CHECKING:
    from prefect_azmanagers.detached.job import DetachedJob

vm_app = typer.Typer(no_args_is_help=True, help="Detached VMs (addproc / rmproc).")
job_app = typer.Typer(no_args_is_help=True, help="Detached jobs (detachat / detach).")

_console = Console()


@vm_app.command("add")
def vm_add(
    template: str = typer.Argument(..., help="Name of the VMTemplate block."),
    nic: Optional[str] = typer.Option(None, "--nic", help="Name of the NICTemplate block."),
    name: Optional[str] = typer.Option(None, "--name", help="VM name (default: BASENAME-xxxxxx)."),
    basename: str = typer.Option("azm", "--basename", help="Prefix of the generated VM name."),
    code: Optional[Path] = typer.Option(
        None, "--code", help="A directory (e.g. flows) to copy to the VM for prefect.yaml deployments."),
    manifest: str = MANIFEST_OPTION,
) -> None:
    """Create a detached VM whose Prefect worker serves the work pool of the same name.

    Example: prefect-azmanagers detached add localcloud-vm --nic localcloud-nic --manifest localcloud
    """
    from prefect_azmanagers.detached.vm import addproc

    vm = addproc(template, nic, name=name, basename=basename, manifest=manifest, code=code)
    _console.print(f"Detached VM [bold]{vm.name}[/bold] at {vm.private_ip}: worker online, "
                   f"work pool {vm.work_pool!r}, deployment {vm.deployment!r}")


@vm_app.command("rm")
def vm_rm(
    name: str = typer.Argument(..., help="Name of the detached VM."),
    manifest: str = MANIFEST_OPTION,
) -> None:
    """Delete a detached VM, its NIC, its work pool and deployments (also if partly gone).

    Example: prefect-azmanagers detached rm azm-x1y2z3 --manifest localcloud
    """
    from prefect_azmanagers.detached.vm import rmproc

    rmproc(name, manifest=manifest)
    _console.print(f"Removed detached VM {name}")


@vm_app.command("list")
def vm_list(manifest: str = MANIFEST_OPTION) -> None:
    """List the detached VMs of the manifest's resource group.

    Example: prefect-azmanagers detached list --manifest localcloud
    """
    from prefect_azmanagers.detached.vm import list_detached_vms

    table = Table("name", "private ip", "work pool", "resource group")
    for vm in list_detached_vms(manifest=manifest):
        table.add_row(vm.name, vm.private_ip, vm.work_pool, vm.resource_group)
    _console.print(table)


def _job(flow_run_id: str) -> DetachedJob:
    """The job of `flow_run_id` (the detached package is imported only by the commands using it)."""
    from prefect_azmanagers.detached.job import DetachedJob

    return DetachedJob.from_flow_run_id(flow_run_id)


@job_app.command("status")
def job_status(flow_run_id: str = typer.Argument(..., help="The job's flow-run id.")) -> None:
    """Print the job's status: starting, running, done, failed or cancelled.

    Example: prefect-azmanagers job status 0691e3c1-5d0c-4c7f-9c1e-1b1a7e0f2a33
    """
    print(_job(flow_run_id).status())


@job_app.command("logs")
def job_logs(
    flow_run_id: str = typer.Argument(..., help="The job's flow-run id."),
    stderr: bool = typer.Option(False, "--stderr", help="Print the job's stderr, not stdout."),
) -> None:
    """Print the job's own stdout (or stderr) so far, exactly as it wrote it.

    Example: prefect-azmanagers job logs 0691e3c1-5d0c-4c7f-9c1e-1b1a7e0f2a33 --stderr
    """
    sys.stdout.write(_job(flow_run_id).read("stderr" if stderr else "stdout"))


@job_app.command("wait")
def job_wait(
    flow_run_id: str = typer.Argument(..., help="The job's flow-run id."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up after this many seconds."),
) -> None:
    """Wait for the job to end and print its final status; exit 1 unless it is done.

    Example: prefect-azmanagers job wait 0691e3c1-5d0c-4c7f-9c1e-1b1a7e0f2a33 --timeout 600
    """
    status = _job(flow_run_id).wait(timeout)
    print(status)
    if status != "done":
        raise typer.Exit(1)


@job_app.command("kill")
def job_kill(flow_run_id: str = typer.Argument(..., help="The job's flow-run id.")) -> None:
    """Cancel the job; its processes on the VM are stopped. Prints the final status.

    Example: prefect-azmanagers job kill 0691e3c1-5d0c-4c7f-9c1e-1b1a7e0f2a33
    """
    status = _job(flow_run_id).kill()
    print(status)
    if status != "cancelled":
        exit_with_error(f"the job had already ended ({status}) before it could be cancelled")
