"""`prefect-azmanagers scalesets|vms ...`: what this package created in Azure (or the local cloud)."""

from __future__ import annotations

import typer

scalesets_app = typer.Typer(no_args_is_help=True, help="Scale sets created by prefect-azmanagers.")
vms_app = typer.Typer(no_args_is_help=True, help="Standalone (detached) VMs created by prefect-azmanagers.")
