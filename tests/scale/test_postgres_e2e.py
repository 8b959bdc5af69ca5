"""A flow on local-cloud workers reporting to a Prefect server on PostgreSQL with Prefect's
Redis messaging (the setup the README's "Large runs" recommends), end to end: real ARM SDK,
real OpenSSH, real agents, a real `prefect server` on the project's own PostgreSQL and Redis.

The local cloud's blocks live in the session's SQLite server; they are copied into the
PostgreSQL-backed one without `prefect_api_url_for_vms` (which names the SQLite server's
forwarder), so the runner forwards this server's port to the instances over SSH instead.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_azmanagers.blocks import AzureManifest, ScaleSetTemplate, load_manifest, \
    load_scaleset_template
from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

pytestmark = pytest.mark.e2e

TASKS = 24


@task
def cube(x: int) -> int:
    return x ** 3


def recorded_states(flow_run_id: uuid.UUID, expected: int, timeout: float = 120) -> list[str]:
    """The flow run's task-run states once `expected` of them are final (the server records
    the states the workers sent as events asynchronously, after the flow returned)."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[flow_run_id])), limit=expected + 50)
            states = sorted(r.state.name for r in runs if r.state)
            if (len(runs) >= expected and all(r.state and r.state.is_final() for r in runs)) \
                    or time.monotonic() > deadline:
                return states
            time.sleep(1.0)


@pytest.fixture(scope="module")
def blocks_on_postgres(localcloud, postgres_prefect_server):
    """The local cloud's manifest and small template, saved in the PostgreSQL-backed server."""
    manifest = load_manifest("localcloud")
    template = load_scaleset_template("localcloud-small")
    fields = manifest.model_dump(exclude={"prefect_api_url_for_vms", "blob_container"})
    with temporary_settings(updates={PREFECT_API_URL: postgres_prefect_server.api_url}):
        AzureManifest(**fields).save("localcloud-direct", overwrite=True)
        ScaleSetTemplate(**template.model_dump()).save("localcloud-small", overwrite=True)
    return "localcloud-direct", "localcloud-small"


def test_a_flow_on_postgres_and_redis_records_every_task_run(postgres_prefect_server,
                                                              blocks_on_postgres):
    manifest, template = blocks_on_postgres
    group = f"pg-{uuid.uuid4().hex[:6]}"

    @flow(task_runner=AzureScaleSetTaskRunner(template, 2, manifest=manifest, group=group,
                                              join_timeout=300))
    def cubes() -> tuple[str, list[int]]:
        from prefect.runtime import flow_run

        return flow_run.id, [f.result() for f in [cube.submit(i) for i in range(TASKS)]]

    with temporary_settings(updates={PREFECT_API_URL: postgres_prefect_server.api_url}):
        flow_run_id, values = cubes()
        assert values == [i ** 3 for i in range(TASKS)]
        states = recorded_states(uuid.UUID(flow_run_id), TASKS)
    assert states == ["Completed"] * TASKS
    log = postgres_prefect_server.log.read_text()
    assert "dropping message" not in log
    # the events that recorded those states went through Redis, not the in-memory broker
    url = postgres_prefect_server.services_env["PREFECT_REDIS_MESSAGING_URL"]
    streams = [key for key in redis.Redis.from_url(url).scan_iter(_type="stream")]
    assert any(b"events" in key for key in streams), streams
