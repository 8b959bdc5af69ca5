"""Shared result storage (issue 15): the manifest's blob container (Azurite on the local cloud)
is the workers' default result storage. Cache records and persisted results land there, so a
cache hit works across instances and flow runs, and a persisted result is read back from
anywhere, after its cluster is gone, without travelling through the SSH channel."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import cloudpickle
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.results import ResultRecordMetadata

from prefect_azmanagers import AzureScaleSetTaskRunner

pytestmark = pytest.mark.e2e

RUN = uuid.uuid4().hex  # cache keys of this test session only
BIG = 3 << 20  # bytes: a result larger than the agent's frames usually carry


@task(cache_key_fn=lambda *_: f"azm-blob-where-{RUN}")
def where_cached() -> str:
    return socket.gethostname()


@task
def where() -> str:
    return socket.gethostname()


@task(persist_result=True)
def big(seed: int) -> bytes:
    return bytes([seed]) * BIG


def runner() -> AzureScaleSetTaskRunner:
    return AzureScaleSetTaskRunner("localcloud-small", 1, manifest="localcloud")


@flow(task_runner=runner())
def cached_sweep() -> tuple[str, str, str]:
    cached = where_cached.submit()
    return cached.result(), cached.state.name, where.submit().result()


@flow(task_runner=runner())
def persisted() -> dict:
    future = big.submit(7)
    future.wait()
    return {"task_run_id": str(future.task_run_id),
            "by_reference": isinstance(future.state.data, ResultRecordMetadata),
            "value_ok": future.result() == bytes([7]) * BIG}


def container():
    from prefect_azure import AzureBlobStorageContainer

    return AzureBlobStorageContainer.load("localcloud")


def test_a_cached_task_from_one_instance_is_a_hit_on_another_in_a_later_flow_run(localcloud):
    first_value, first_state, first_host = cached_sweep()
    assert first_state == "Completed" and first_value == first_host
    # a fresh runner: a new scale set, another instance that never ran the task
    second_value, second_state, second_host = cached_sweep()
    assert second_host != first_host
    assert second_state == "Cached"
    assert second_value == first_host  # the record the first instance wrote, read by the second
    assert any(name for name in container().list_blobs())


def test_a_persisted_result_is_read_from_the_container_after_the_cluster_is_gone(localcloud):
    out = persisted()
    assert out["value_ok"]
    assert out["by_reference"], "the persisted value travelled back through the SSH channel"
    with get_client(sync_client=True) as client:
        state = client.read_task_run(out["task_run_id"]).state
    assert isinstance(state.data, ResultRecordMetadata)
    assert state.result() == bytes([7]) * BIG  # read from Blob Storage, no cluster running
    assert state.data.storage_key in container().list_blobs()


def test_the_containers_credential_is_in_no_customdata_log_or_pickled_runner(localcloud):
    key = localcloud["blob_key"]
    assert key and key not in cloudpickle.dumps(runner()).decode("latin-1")
    cached_sweep()  # a flow run whose workers load the container from the API
    state_dir = Path(localcloud["state_dir"])
    holders = [str(path.relative_to(state_dir)) for path in state_dir.rglob("*")
               if path.is_file() and path.name != "localcloud.json" and _holds(path, key)]
    assert holders == []  # the ARM store (customData), instance disks, boot and sshd logs
    with get_client(sync_client=True) as client:
        logs = client.read_logs()
    assert logs and not any(key in log.message for log in logs)


def _holds(path: Path, secret: str) -> bool:
    try:
        return secret.encode() in path.read_bytes()
    except OSError:
        return False


def test_a_blob_container_that_is_not_saved_fails_before_anything_is_provisioned(localcloud, admin):
    from prefect_azmanagers.blocks import load_manifest
    from prefect_azmanagers.exceptions import ConfigurationError

    manifest = load_manifest("localcloud").model_copy(update={"blob_container": "nowhere"})

    @flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 1, manifest=manifest))
    def nothing() -> int:
        return 1

    scale_sets = {s["name"] for s in admin.status()["scale_sets"]}
    # the saved ones are listed (other test files of this session may have saved more)
    with pytest.raises(ConfigurationError, match=r"'nowhere' names no saved AzureBlobStorageContainer "
                                                 r"block in this Prefect API \(saved: \[[^]]*'localcloud'"):
        nothing()
    assert {s["name"] for s in admin.status()["scale_sets"]} == scale_sets
