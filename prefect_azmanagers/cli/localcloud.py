"""`prefect-azmanagers localcloud ...`: start, stop and inspect the offline ARM-compatible cloud."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="The offline, ARM-compatible local cloud.")
