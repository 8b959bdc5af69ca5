"""The driver's view of detached jobs: `detachat`, `detach` and `DetachedJob`.

A job is one flow run of the VM's `azmanagers-detached/<vm>` deployment; everything about it
(state, output streams, return value) lives in the Prefect API, so a `DetachedJob` is only a
flow-run id: any process that can reach the API re-attaches with
`DetachedJob.from_flow_run_id(id)`, also after the process that started it has exited and after
the VM is gone.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import sysconfig
import time
import types
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import cloudpickle
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType, LogFilter, LogFilterFlowRunId,
    LogFilterTimestamp,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import LogSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Cancelling, Crashed

from prefect_azmanagers.detached.bundle import variablebundle
from prefect_azmanagers.detached.runtime import (
    PARTIAL_SUFFIX, RESULT_ARTIFACT_TYPE, STREAM_LOGGER, DetachedJobFailed,
)
from prefect_azmanagers.detached.signing import load_driver_key
from prefect_azmanagers.detached.vm import DetachedVM, upload_payload, vm_lost_reason
from prefect_azmanagers.exceptions import DetachedJobError, PayloadError, UntrustedPayload

Status = Literal["starting", "running", "done", "failed", "cancelled"]

_STATUS = {
    StateType.SCHEDULED: "starting", StateType.PENDING: "starting",
    StateType.RUNNING: "running", StateType.PAUSED: "running", StateType.CANCELLING: "running",
    StateType.COMPLETED: "done", StateType.FAILED: "failed", StateType.CRASHED: "failed",
    StateType.CANCELLED: "cancelled",
}
FINAL_STATUSES = ("done", "failed", "cancelled")

# Prefect refuses flow-run parameters above 512 KiB of JSON; payloads whose base64 text is
# longer than this travel over SFTP to the VM instead.
MAX_INLINE_PAYLOAD = 400 * 1024
_LOG_PAGE = 200


class DetachedJob:
    """A job running (or run) on a detached VM, identified by its Prefect flow-run id."""

    def __init__(self, flow_run_id: UUID | str):
        self.flow_run_id = str(flow_run_id)

    def __repr__(self) -> str:
        return f"DetachedJob({self.flow_run_id!r})"

    @classmethod
    def from_flow_run_id(cls, flow_run_id: UUID | str) -> DetachedJob:
        """Re-attach to a job, e.g. from another process; checks that the flow run exists."""
        try:
            UUID(str(flow_run_id))
        except ValueError:
            raise DetachedJobError(f"{flow_run_id!r} is not a flow-run id (a UUID)") from None
        job = cls(flow_run_id)
        job._flow_run()
        return job

    def _flow_run(self):
        with get_client(sync_client=True) as client:
            try:
                return client.read_flow_run(UUID(self.flow_run_id))
            except ObjectNotFound:
                raise DetachedJobError(
                    f"no flow run {self.flow_run_id} in the Prefect API at "
                    f"{client.api_url}: check the id and PREFECT_API_URL") from None

    def status(self) -> Status:
        """"starting", "running", "done", "failed" or "cancelled".

        A job whose VM was lost (deleted, evicted, crashed: its worker fell silent and ARM
        confirms the VM no longer runs) is marked Crashed in the API and reads "failed".
        """
        flow_run = self._flow_run()
        status = "starting" if flow_run.state is None else _STATUS[flow_run.state.type]
        if status in FINAL_STATUSES or not flow_run.work_pool_name:
            return status
        reason = vm_lost_reason(flow_run.work_pool_name, flow_run.deployment_id)
        if reason is None:
            return status
        with get_client(sync_client=True) as client:
            result = client.set_flow_run_state(UUID(self.flow_run_id), Crashed(message=reason))
        return _STATUS[result.state.type] if result.state is not None else status

    def wait(self, timeout: float | None = None, *, poll: float = 1.0) -> Status:
        """Block until the job has ended; returns its final status.

        Raises DetachedJobError if `timeout` seconds pass first (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self.status()) not in FINAL_STATUSES:
            if deadline is not None and time.monotonic() >= deadline:
                raise DetachedJobError(
                    f"detached job {self.flow_run_id} still {status!r} after {timeout} s; it keeps "
                    f"running: wait again, or cancel it (`prefect-azmanagers job kill {self.flow_run_id}`)")
            time.sleep(poll)
        return status

    def _records(self) -> Iterator[Any]:
        """The flow run's log records in timestamp order (paged by timestamp, deduplicated)."""
        seen: set[UUID] = set()
        after: datetime | None = None
        with get_client(sync_client=True) as client:
            while True:
                log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(self.flow_run_id)]))
                if after is not None:
                    log_filter.timestamp = LogFilterTimestamp(after_=after)
                page = client.read_logs(log_filter, limit=_LOG_PAGE, sort=LogSort.TIMESTAMP_ASC)
                fresh = [log for log in page if log.id not in seen]
                yield from fresh
                seen.update(log.id for log in fresh)
                if len(page) < _LOG_PAGE:
                    return
                if not fresh:  # a whole page of one timestamp: cannot happen with our records
                    raise DetachedJobError("more than one page of log records share a timestamp")
                after = page[-1].timestamp

    def read(self, stdio: Literal["stdout", "stderr"] = "stdout") -> str:
        """The job's own stdout or stderr so far, complete and in order.

        The last lines reach the API shortly after the job ends; once `status()` is final,
        the flow run has flushed them, so `wait()` then `read()` sees everything.
        """
        if stdio not in ("stdout", "stderr"):
            raise ValueError(f'stdio must be "stdout" or "stderr", got {stdio!r}')
        whole = STREAM_LOGGER.format(stream=stdio)
        parts = []
        for record in self._records():
            if record.name == whole:
                parts.append(record.message + "\n")
            elif record.name == whole + PARTIAL_SUFFIX:
                parts.append(record.message)
        return "".join(parts)

    def kill(self, timeout: float = 120) -> Status:
        """Cancel the flow run; the worker on the VM stops the job's processes.

        Returns the final status ("cancelled", or "done"/"failed" if the job ended first).
        """
        flow_run = self._flow_run()
        status = _STATUS[flow_run.state.type] if flow_run.state else "starting"
        if status in FINAL_STATUSES:
            return status
        with get_client(sync_client=True) as client:
            # A run no worker has picked up yet has no process to stop: cancel it outright.
            state = Cancelled() if flow_run.state.type == StateType.SCHEDULED else Cancelling()
            client.set_flow_run_state(UUID(self.flow_run_id), state, force=True)
        return self.wait(timeout)

    def _signed_result(self, status: Status) -> dict[str, Any]:
        """The data of the run's one result artifact, checked against its VM's key.

        UntrustedPayload, before anything is unpickled, for a run with several result
        artifacts or one its VM did not sign (written through the Prefect API by another).
        """
        flow_run = self._flow_run()
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(self.flow_run_id)]),
                type=ArtifactFilterType(any_=[RESULT_ARTIFACT_TYPE])))
        if not artifacts:
            raise DetachedJobError(
                f"detached job {self.flow_run_id} ended {status!r} without storing a result "
                f"(the flow process died?); its stderr:\n{self.read('stderr')[-3000:]}")
        if len(artifacts) > 1:
            raise UntrustedPayload(
                f"detached job {self.flow_run_id} has {len(artifacts)} result artifacts; its VM "
                "writes exactly one, so the others were written through the Prefect API by "
                "someone else; refused without unpickling any")
        signed = artifacts[0].data
        if not isinstance(signed, dict) or not all(
                isinstance(signed.get(field), str) for field in ("vm", "key_id", "mac")):
            raise UntrustedPayload(
                f"the result artifact of detached job {self.flow_run_id} carries no signature: it "
                "was not written by a detached VM; refused without unpickling")
        # The run names its VM's pool until rmproc deletes the pool; then the key decides.
        if flow_run.work_pool_name not in (None, signed["vm"]):
            raise UntrustedPayload(
                f"the result artifact of detached job {self.flow_run_id} claims detached VM "
                f"{signed['vm']}, but the run belongs to {flow_run.work_pool_name}; refused")
        key = load_driver_key(signed["vm"], signed["key_id"])
        return key.check_result(self.flow_run_id, signed)

    def _result_bytes(self, data: dict[str, Any]) -> bytes | None:
        """The pickled outcome: in the signed artifact, or in the result storage it names
        (checked against the signed SHA-256 before anything unpickles it)."""
        blob = data.get("blob")
        if not blob:
            return base64.b64decode(data["pickle"]) if data["pickle"] else None
        from prefect.blocks.core import Block

        pickled = Block.load(blob["block"]).read_path(blob["path"])
        if hashlib.sha256(pickled).hexdigest() != blob["sha256"]:
            raise UntrustedPayload(
                f"the result of detached job {self.flow_run_id} in {blob['block']} at {blob['path']} "
                "is not the one its VM signed (changed in the storage); refused without unpickling")
        return pickled

    def result(self, timeout: float | None = None) -> Any:
        """The job's return value; waits for the end. Raises DetachedJobFailed if it raised,
        UntrustedPayload if its result artifact is not the one its VM signed (see `signing`)."""
        status = self.wait(timeout)
        if status == "cancelled":
            raise DetachedJobError(f"detached job {self.flow_run_id} was cancelled")
        data = self._signed_result(status)
        pickled = self._result_bytes(data)
        try:
            value = cloudpickle.loads(pickled) if pickled else None
        except Exception as exc:
            if data["ok"]:
                raise DetachedJobError(
                    f"the return value of detached job {self.flow_run_id} cannot be unpickled "
                    f"here ({exc}): import or install what it needs in this environment") from exc
            value = None  # the job's exception type is unknown here; its traceback says all
        if data["ok"]:
            return value
        raise DetachedJobFailed(self.flow_run_id, data["traceback"]) from value


def _ships_by_value(module_name: str | None) -> types.ModuleType | None:
    """The module to pickle by value if it is the user's own file (not installed on the VM)."""
    module = sys.modules.get(module_name or "")
    origin = getattr(getattr(module, "__spec__", None), "origin", None)
    if module is None or module_name == "__main__" or origin in (None, "built-in", "frozen"):
        return None  # __main__ is pickled by value anyway
    if module_name.split(".")[0] == "prefect_azmanagers":
        return None  # installed on every VM (contract "Inside an instance")
    installed = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib",
                                                        "platstdlib")}
    return None if any(Path(origin).is_relative_to(root) for root in installed) else module


def pickle_job(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    """Cloudpickle a job; the module defining `fn` goes by value if it is the user's file.

    The user's script or test module is not installed on the VM, so functions defined there
    are shipped by value (as Prefect's bundles do); installed packages go by reference.
    """
    job = {"fn": fn, "args": args, "kwargs": kwargs, "variablebundle": dict(variablebundle)}
    module = _ships_by_value(getattr(fn, "__module__", None) or type(fn).__module__)
    if module is not None:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(job)
    except Exception as exc:
        raise PayloadError(
            f"cannot pickle the detached job ({fn!r} with its arguments and variablebundle): "
            f"{exc}; pass picklable values (open files, sockets, locks cannot travel)") from exc
    finally:
        if module is not None:
            cloudpickle.unregister_pickle_by_value(module)


def _submit(vm: DetachedVM, fn: Callable[..., Any], args: tuple, kwargs: dict) -> DetachedJob:
    if not callable(fn):
        raise PayloadError(f"a detached job must be a callable, got {fn!r}")
    key = load_driver_key(vm.name, vm.vm_id)
    payload = pickle_job(fn, args, kwargs)
    inline = base64.b64encode(payload).decode()
    parameters = ({"payload": inline} if len(inline) <= MAX_INLINE_PAYLOAD
                  else {"payload_file": upload_payload(vm, payload)})
    parameters.update(key.sign_payload(payload))
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(vm.deployment)
        except ObjectNotFound:
            raise DetachedJobError(
                f"detached VM {vm.name} has no deployment {vm.deployment!r} in the Prefect API "
                f"at {client.api_url}: was it removed (rmproc)? Create a VM with addproc.") from None
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters=parameters,
            name=f"{getattr(fn, '__name__', type(fn).__name__)}-on-{vm.name}")
    return DetachedJob(flow_run.id)


def detachat(vm: DetachedVM | str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
             ) -> DetachedJob:
    """Run `fn(*args, **kwargs)` on a detached VM as a flow run; returns at once.

    `fn` is any picklable callable (closures and functions of the user's own script travel by
    value); the current `variablebundle` goes with it. `vm` is a DetachedVM or the name of one
    (looked up with the default manifest). The job keeps running when this process exits.
    """
    if isinstance(vm, str):
        vm = DetachedVM.from_name(vm)
    return _submit(vm, fn, args, kwargs)
