"""What runs on the detached VM: the generic flow `run_detached` and the job process it starts.

The Prefect worker on the VM runs `run_detached` (deployed once per VM work pool by module
path, so no code is shipped beyond the installed package). The flow:

1. takes the job's cloudpickled payload (callable, args, kwargs, variablebundle) from its
   `payload` parameter, or, when larger than Prefect's parameter limit, from the file the driver
   uploaded over SFTP into `~/.azmanagers/payloads/`, and checks its signature (`signing`:
   the VM's key, a nonce never used before) before anything unpickles it;
2. runs the callable in a child process (`python -m prefect_azmanagers.detached.jobprocess DIR`)
   whose fds 1 and 2 are pipes: the job's own output, including that of processes it starts,
   is kept apart from Prefect's own console logging;
3. forwards every stdout/stderr chunk, in order, as a flow-run log record named
   `job.stdout` / `job.stderr` (`.partial` when the chunk does not end a line), which is how
   the driver reads the streams (also after the VM is gone) and how the UI shows them; the
   same bytes are kept in `~/.azmanagers/jobs/<flow run id>/stdout|stderr` on the VM;
4. stores the return value (or the exception) cloudpickled in a flow-run artifact of type
   `azmanagers-result`, signed with the VM's key, which the driver checks before it unpickles
   (a refused payload gets a signed failure naming why); with a default result storage (the
   manifest's blob container) the pickle goes there instead, and the signed artifact names its
   path and SHA-256, which the driver checks after reading it;
5. fails the flow run when the job raised, with the job's traceback in its stderr.

Cancelling the flow run (`DetachedJob.kill`) makes the worker terminate the flow process; the
job process is killed with it (same process group, `finally` in the flow, and the kernel's
parent-death signal as a last resort).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import cloudpickle
from prefect import flow, get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run

from prefect_azmanagers.detached.signing import JobKey, claim_nonce, load_vm_key
from prefect_azmanagers.exceptions import AzManagersError, UntrustedPayload

STATE_DIR = Path("~/.azmanagers")
PAYLOAD_DIR = STATE_DIR / "payloads"
JOBS_DIR = STATE_DIR / "jobs"
RESULT_ARTIFACT_TYPE = "azmanagers-result"
STREAM_LOGGER = "job.{stream}"
PARTIAL_SUFFIX = ".partial"
FLOW_NAME = "azmanagers-detached"

# Log records carry at most this many bytes of a line; a longer line is sent as several
# `.partial` records and reassembled by the reader (Prefect truncates logs above 1 MB).
CHUNK_BYTES = 64 * 1024


class DetachedJobFailed(AzManagersError):
    """A detached job raised; `traceback` is the job's own traceback (also in its stderr)."""

    def __init__(self, flow_run_id: str, traceback: str):
        super().__init__(f"detached job {flow_run_id} failed; its traceback:\n{traceback}")
        self.flow_run_id = flow_run_id
        self.traceback = traceback


class _StreamForwarder(threading.Thread):
    """Copies one pipe of the job process to a file and to the flow run's logs, in order."""

    _clock_lock = threading.Lock()
    _last_timestamp = 0.0

    def __init__(self, pipe: IO[bytes], stream: str, copy: Path, flow_run_id: str,
                 handler: logging.Handler):
        super().__init__(name=f"azmanagers-{stream}", daemon=True)
        self.pipe, self.stream, self.copy = pipe, stream, copy
        self.flow_run_id, self.handler = flow_run_id, handler

    @classmethod
    def _next_timestamp(cls) -> float:
        # Strictly increasing across both streams: the reader pages by timestamp, and equal
        # timestamps would leave the order of two lines to the database.
        with cls._clock_lock:
            now = max(time.time(), cls._last_timestamp + 1e-6)
            cls._last_timestamp = now
            return now

    def run(self) -> None:
        name = STREAM_LOGGER.format(stream=self.stream)
        with self.copy.open("ab") as copy:
            for chunk in iter(lambda: self.pipe.readline(CHUNK_BYTES), b""):
                copy.write(chunk)
                copy.flush()
                whole_line = chunk.endswith(b"\n")
                record = logging.LogRecord(
                    name if whole_line else name + PARTIAL_SUFFIX, logging.INFO, __file__, 0,
                    chunk[:-1].decode(errors="replace") if whole_line
                    else chunk.decode(errors="replace"), None, None,
                )
                record.created = self._next_timestamp()
                record.flow_run_id = self.flow_run_id
                self.handler.handle(record)


def _load_payload(payload: str | None, payload_file: str | None) -> bytes:
    if (payload is None) == (payload_file is None):
        raise ValueError("run_detached needs exactly one of `payload` or `payload_file`")
    if payload is not None:
        return base64.b64decode(payload)
    # Only a bare file name inside the payload directory: the parameter must not name any
    # other file of the VM.
    if Path(payload_file).name != payload_file:
        raise ValueError(f"payload_file must be a bare file name, got {payload_file!r}")
    path = PAYLOAD_DIR.expanduser() / payload_file
    data = path.read_bytes()
    path.unlink()
    return data


def _store_result(key: JobKey, flow_run_id: str, outcome: dict[str, Any]) -> None:
    pickled = outcome.get("pickle")
    blob = _put_in_result_storage(flow_run_id, pickled) if pickled is not None else None
    data = {"ok": outcome["ok"],
            "pickle": base64.b64encode(pickled).decode() if pickled is not None and blob is None else None,
            "traceback": outcome.get("traceback"),
            "blob": blob}
    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(
            type=RESULT_ARTIFACT_TYPE, flow_run_id=flow_run_id,
            description="Return value of a detached job (cloudpickle, base64, signed by its "
                        "VM); read it with `DetachedJob.from_flow_run_id(id).result()`.",
            data=key.sign_result(flow_run_id, data),
        ))


def _put_in_result_storage(flow_run_id: str, pickled: bytes) -> dict[str, str] | None:
    """Write the pickled outcome to the default result storage block, if one is set; returns
    where it is and its digest (for the signed artifact)."""
    from prefect.blocks.core import Block
    from prefect.settings import get_current_settings

    slug = get_current_settings().results.default_storage_block
    if not slug:
        return None
    path = f"azmanagers-detached/{flow_run_id}/result.pkl"
    Block.load(slug).write_path(path, pickled)
    return {"block": slug, "path": path, "sha256": hashlib.sha256(pickled).hexdigest()}


def _run_job_process(job_dir: Path, flow_run_id: str) -> dict[str, Any]:
    """Run the payload in a child process, forwarding its output; return its outcome."""
    handler = APILogHandler()
    child = subprocess.Popen(
        [sys.executable, "-m", "prefect_azmanagers.detached.jobprocess", str(job_dir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=job_dir,
    )
    forwarders = [_StreamForwarder(child.stdout, "stdout", job_dir / "stdout", flow_run_id, handler),
                  _StreamForwarder(child.stderr, "stderr", job_dir / "stderr", flow_run_id, handler)]
    try:
        for forwarder in forwarders:
            forwarder.start()
        child.wait()
        for forwarder in forwarders:
            forwarder.join()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        handler.flush()
    outcome_file = job_dir / "outcome.pkl"
    if not outcome_file.exists():
        return {"ok": False, "pickle": None,
                "traceback": f"the job process exited with code {child.returncode} "
                             "without reporting an outcome (killed?)"}
    outcome = cloudpickle.loads(outcome_file.read_bytes())
    # The payload and outcome now live in the Prefect API; the output copies stay for debugging.
    outcome_file.unlink()
    (job_dir / "payload.pkl").unlink()
    return outcome


@flow(name=FLOW_NAME, persist_result=False, validate_parameters=False)
def run_detached(payload: str | None = None, payload_file: str | None = None,
                 key_id: str | None = None, nonce: str | None = None,
                 mac: str | None = None) -> None:
    """Run one detached job (a cloudpickled callable, signed by the driver) on this VM; see
    the module docstring."""
    flow_run_id = str(flow_run.id)
    key = load_vm_key()
    data = _load_payload(payload, payload_file)
    try:
        key.check_payload(data, key_id=key_id, nonce=nonce, mac=mac)
        claim_nonce(nonce)
    except UntrustedPayload as exc:
        _store_result(key, flow_run_id, {"ok": False, "traceback": f"refused by the VM: {exc}"})
        raise
    job_dir = JOBS_DIR.expanduser() / flow_run_id
    job_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    payload_path = job_dir / "payload.pkl"
    payload_path.write_bytes(data)
    payload_path.chmod(0o600)
    outcome = _run_job_process(job_dir, flow_run_id)
    _store_result(key, flow_run_id, outcome)
    if not outcome["ok"]:
        raise DetachedJobFailed(flow_run_id, outcome["traceback"])
