"""`python -m prefect_azmanagers.cli`: the same as the `prefect-azmanagers` command."""

from prefect_azmanagers.cli import app

app()
