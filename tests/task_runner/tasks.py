"""Tasks shared by the adapter's unit and end-to-end tests (this module is not installed on
instances, so it also travels by value)."""

from __future__ import annotations

import asyncio

from prefect import task


@task
def square(x):
    return x * x


@task
async def async_double(x):
    await asyncio.sleep(0.01)
    return 2 * x


@task
def add(a, b):
    return a + b
