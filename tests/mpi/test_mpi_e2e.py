"""MPI ranks per worker end to end on the local cloud: AzureCluster provisions an instance
through the real ARM SDK and starts each worker as `mpirun -n K ... agent` over real OpenSSH."""

from __future__ import annotations

import sys
import time
import uuid

import cloudpickle
import pytest

from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.exceptions import MPIRankError
from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # instances cannot import tests


def allreduce_ranks() -> tuple[int, int]:
    from prefect_azmanagers.mpi import comm

    c = comm()
    print(f"rank {c.Get_rank()} reducing")
    return c.Get_size(), c.allreduce(c.Get_rank() + 1)


def fails_on_rank(bad: int):
    def task() -> int:
        from prefect_azmanagers.mpi import comm

        c = comm()
        total = c.allreduce(1)
        if c.Get_rank() == bad:
            raise ZeroDivisionError(f"rank {bad} divided by zero")
        return total
    return task


def fails_before_collective() -> int:
    from prefect_azmanagers.mpi import comm

    c = comm()
    if c.Get_rank() == 1:
        raise RuntimeError("rank 1 gave up before the reduction")
    return c.allreduce(1)


@pytest.fixture(scope="module")
def admin(localcloud):
    with LocalCloudAdmin.from_info(localcloud) as client:
        yield client


def _wait_for_line(lines: list[str], text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(text in line for line in lines):
        time.sleep(0.1)
    assert any(text in line for line in lines), lines


@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.slow)])  # K=4: rank-side tests
def test_allreduce_on_k_ranks_and_failing_ranks(localcloud, admin, ranks):
    group = f"mpi{ranks}-{uuid.uuid4().hex[:6]}"
    lines: list[str] = []
    with AzureCluster("localcloud-small", 1, manifest="localcloud", group=group,
                      mpi_ranks_per_worker=ranks, progress=False, warm_up=None, join_timeout=300,
                      waitfor=True) as cluster:
        cluster.output_handler = lambda worker, stream, line: lines.append(line)
        expected = (ranks, ranks * (ranks + 1) // 2)
        assert [cluster.submit(allreduce_ranks).result(timeout=120) for _ in range(3)] == [expected] * 3
        for rank in range(ranks):
            _wait_for_line(lines, f"[rank {rank}] rank {rank} reducing")

        with pytest.raises(MPIRankError) as info:
            cluster.submit(fails_on_rank(ranks - 1)).result(timeout=120)
        assert info.value.rank == ranks - 1
        assert f"MPI rank {ranks - 1} of {ranks} failed" in str(info.value)
        assert "divided by zero" in info.value.remote_traceback
        assert cluster.submit(allreduce_ranks).result(timeout=120) == expected  # worker unharmed

        with pytest.raises(MPIRankError, match="rank 1 gave up before the reduction"):
            cluster.submit(fails_before_collective).result(timeout=120)
        # the stuck worker ended itself; the engine brings the slot back and work goes on
        assert cluster.submit(allreduce_ranks).result(timeout=300) == expected
    assert [i for i in admin.status()["instances"] if i["scale_set"] == group] == []
