"""The user-facing MPI helpers outside an MPI worker: clear errors, no wrapping."""

from __future__ import annotations

import pytest
from prefect import task

from prefect_azmanagers.exceptions import ConfigurationError
from prefect_azmanagers.mpi import checking_other_ranks, comm


def test_comm_outside_an_mpi_worker_says_how_to_get_one(monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="mpi_ranks_per_worker"):
        comm()


def test_tasks_are_left_alone_outside_mpi(monkeypatch):
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)

    @task
    def add(a, b):
        return a + b

    assert checking_other_ranks(add, None) is add
