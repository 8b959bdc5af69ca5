"""What every `prefect-azmanagers` sub-app shares: the --manifest option and the error exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

_stderr = Console(stderr=True)

# The --manifest option of every command that talks to Azure.
MANIFEST_OPTION = typer.Option("default", "--manifest", "-m", help="Name of the AzureManifest block.")


def exit_with_error(message: str) -> NoReturn:
    """Print `message` as a red error on stderr and exit with status 1."""
    _stderr.print(f"[red]Error:[/red] {escape(message)}")
    raise typer.Exit(1)
