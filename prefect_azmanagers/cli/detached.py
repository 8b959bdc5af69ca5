"""`prefect-azmanagers vm|job ...`: detached VMs and the jobs running on them."""

from __future__ import annotations

import typer

vm_app = typer.Typer(no_args_is_help=True, help="Detached VMs (addproc / rmproc).")
job_app = typer.Typer(no_args_is_help=True, help="Detached jobs (detachat / detach).")
