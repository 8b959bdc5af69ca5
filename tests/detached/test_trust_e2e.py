"""Detached payloads and results are authenticated, end to end on the local cloud.

Whoever can write to the Prefect API can create flow runs of a detached VM's deployment and
artifacts on any flow run. Here the test is that party: it writes forged, replayed and
duplicated payloads and result artifacts through the real Prefect API, and checks that neither
the VM nor the driver unpickles them (each forged pickle would create a file when unpickled).
"""

from __future__ import annotations

import base64
import uuid

import cloudpickle
import pytest
from prefect import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.states import Completed

from prefect_azmanagers.detached import DetachedJob, DetachedJobFailed, detachat
from prefect_azmanagers.detached.runtime import RESULT_ARTIFACT_TYPE
from prefect_azmanagers.exceptions import DetachedJobError, UntrustedPayload

pytestmark = pytest.mark.e2e


class _CreatesFileWhenUnpickled:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _deployment_id(vm):
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(vm.deployment).id


def _flow_run(vm, *, parameters=None, state=None) -> str:
    """A flow run of the VM's deployment made directly through the API (not by detachat)."""
    with get_client(sync_client=True) as client:
        return str(client.create_flow_run_from_deployment(
            _deployment_id(vm), parameters=parameters or {}, state=state).id)


def _write_artifact(flow_run_id: str, data) -> None:
    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(type=RESULT_ARTIFACT_TYPE, flow_run_id=flow_run_id,
                                              data=data))


def _artifacts(flow_run_id: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))


def test_a_forged_result_artifact_is_refused_before_unpickling(detached_vm, tmp_path):
    marker = tmp_path / "unpickled-on-the-driver"
    forged = base64.b64encode(cloudpickle.dumps(_CreatesFileWhenUnpickled(str(marker)))).decode()
    # A "completed" run no VM ever ran, with a result artifact written through the API.
    run = _flow_run(detached_vm, state=Completed())
    with pytest.raises(DetachedJobError, match="without storing a result"):
        DetachedJob(run).result()                                     # missing
    _write_artifact(run, {"ok": True, "pickle": forged, "traceback": None})
    with pytest.raises(UntrustedPayload, match="carries no signature"):
        DetachedJob(run).result()
    # The same with a made-up signature of the right shape.
    run = _flow_run(detached_vm, state=Completed())
    _write_artifact(run, {"ok": True, "pickle": forged, "traceback": None,
                          "vm": detached_vm.name, "key_id": detached_vm.vm_id, "mac": "0" * 64})
    with pytest.raises(UntrustedPayload, match=f"not signed by detached VM {detached_vm.name}"):
        DetachedJob(run).result()
    assert not marker.exists()


def test_a_genuine_result_copied_or_duplicated_is_refused(detached_vm):
    job = detachat(detached_vm, sum, [1, 2, 3])
    assert job.result(timeout=300) == 6
    [genuine] = _artifacts(job.flow_run_id)
    # Copied onto another run: the signature covers the run id.
    run = _flow_run(detached_vm, state=Completed())
    _write_artifact(run, genuine.data)
    with pytest.raises(UntrustedPayload, match="not signed by detached VM"):
        DetachedJob(run).result()
    # A second result artifact on the genuine run (even an exact copy).
    _write_artifact(job.flow_run_id, genuine.data)
    with pytest.raises(UntrustedPayload, match="has 2 result artifacts"):
        job.result()


def test_forged_and_replayed_payloads_are_refused_on_the_vm(detached_vm, run_on_vm):
    home = f"/home/{detached_vm.admin_username}"
    marker = f"{home}/unpickled-on-the-vm-{uuid.uuid4().hex}"
    forged = base64.b64encode(cloudpickle.dumps(_CreatesFileWhenUnpickled(marker))).decode()
    # Unsigned, and signed with a made-up MAC.
    for extra in ({}, {"key_id": detached_vm.vm_id, "nonce": "1" * 32, "mac": "0" * 64}):
        job = DetachedJob(_flow_run(detached_vm, parameters={"payload": forged, **extra}))
        assert job.wait(timeout=300) == "failed"
        with pytest.raises(DetachedJobFailed, match="refused by the VM"):
            job.result()   # the VM's signed statement of why
    # A genuine job's parameters replayed in a new flow run.
    genuine = detachat(detached_vm, sum, [4, 5])
    assert genuine.result(timeout=300) == 9
    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(genuine.flow_run_id).parameters
    replay = DetachedJob(_flow_run(detached_vm, parameters=parameters))
    assert replay.wait(timeout=300) == "failed"
    with pytest.raises(DetachedJobFailed, match="already ran on this VM"):
        replay.result()
    assert run_on_vm(detached_vm, f"test -e {marker}").exit_status == 1


def test_the_vm_key_is_private_and_absent_from_the_api(detached_vm, run_on_vm):
    from prefect_azmanagers.detached.signing import load_driver_key

    shown = run_on_vm(detached_vm, "stat -c %a ~/.azmanagers/detached.key").stdout.strip()
    assert shown == "600"
    secret = load_driver_key(detached_vm.name, detached_vm.vm_id).secret
    job = detachat(detached_vm, sum, [1])
    assert job.result(timeout=300) == 1
    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(job.flow_run_id).parameters
    texts = [str(parameters), *(str(a.data) for a in _artifacts(job.flow_run_id))]
    for encoded in (secret.hex(), base64.b64encode(secret).decode()):
        assert all(encoded not in text for text in texts)
