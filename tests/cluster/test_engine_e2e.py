"""AzureCluster end to end on the local cloud: real ARM SDK, real OpenSSH in network
namespaces, real agents. Plain callables only (the Prefect adapter is tested elsewhere)."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import psutil
import pytest

from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.cluster.errors import RemoteError
from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

pytestmark = pytest.mark.e2e


def group_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def admin(localcloud):
    with LocalCloudAdmin.from_info(localcloud) as client:
        yield client


def instances_of(admin: LocalCloudAdmin, group: str) -> list[dict]:
    return [i for i in admin.status()["instances"] if i["scale_set"] == group]


def scale_sets_named(admin: LocalCloudAdmin, group: str) -> list[dict]:
    return [s for s in admin.status()["scale_sets"] if s["name"] == group]


def ssh_connections_to(addresses: set[str]) -> list:
    return [c for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.ip in addresses]


def assert_nothing_left(admin: LocalCloudAdmin, group: str, addresses: set[str]) -> None:
    assert instances_of(admin, group) == []
    assert scale_sets_named(admin, group) == []
    assert ssh_connections_to(addresses) == []
    assert not [t for t in threading.enumerate() if t.name == "azm-cluster"]


def square(x: int) -> int:
    return x * x


def where() -> tuple[str, int, str]:
    import socket
    return socket.gethostname(), os.getpid(), os.environ.get("AZM_WORKER_ID", "")


def fails_deep() -> None:
    def level_two():
        raise KeyError("missing thing 42")
    level_two()


class Unpicklable(Exception):
    def __init__(self, a, b):  # cloudpickle cannot rebuild it from args
        super().__init__(f"{a}/{b}")
        self.lock = threading.Lock()


def raises_unpicklable() -> None:
    raise Unpicklable(1, 2)


def chatty() -> str:
    print("line one from a task")
    print("line two from a task", flush=True)
    return "done"


def test_results_tracebacks_output_and_clean_close(localcloud, admin):
    group = group_name("eng")
    lines: list[tuple[int, str, str]] = []
    cluster = AzureCluster("localcloud-small", 2, manifest="localcloud", ppi=2, group=group,
                           progress=False, join_timeout=300, waitfor=True)
    cluster.output_handler = lambda w, stream, line: lines.append((w.id, stream, line))
    with cluster:
        workers = cluster.workers
        assert len(workers) == 4 and {w.state for w in workers} == {"idle"}
        addresses = {w.ip for w in workers}
        assert len(addresses) == 2

        futures = [cluster.submit(lambda i=i: square(i)) for i in range(40)]
        assert [f.result(timeout=120) for f in futures] == [i * i for i in range(40)]
        placements = {cluster.submit(where).result(timeout=60) for _ in range(20)}
        assert all(p[0] and p[2] for p in placements)

        with pytest.raises(KeyError, match="missing thing 42") as info:
            cluster.submit(fails_deep).result(timeout=60)
        assert "level_two" in info.value.remote_traceback

        with pytest.raises(RemoteError) as info:
            cluster.submit(raises_unpicklable).result(timeout=60)
        assert "Unpicklable" in str(info.value) and "raises_unpicklable" in info.value.remote_traceback

        assert cluster.submit(chatty).result(timeout=60) == "done"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("line two" in l[2] for l in lines):
            time.sleep(0.1)
        texts = [l[2] for l in lines if l[1] == "stdout"]
        assert "line one from a task" in texts and "line two from a task" in texts
        assert sum(w.tasks_run for w in cluster.workers) == 40 + 20 + 3
        assert len(instances_of(admin, group)) == 2
    assert_nothing_left(admin, group, addresses)
