"""The detached job's own process: `python -m prefect_azmanagers.detached.jobprocess JOB_DIR`.

Started by the `run_detached` flow on the VM with its stdout/stderr on pipes. Reads
`JOB_DIR/payload.pkl` (callable, args, kwargs, variablebundle; written by `run_detached` once
its signature checked out), fills `variablebundle`, calls,
and writes `JOB_DIR/outcome.pkl` (`ok`, the cloudpickled value or exception, the traceback).
Imports nothing heavy: what the job needs, the job imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import cloudpickle


def _set_parent_death_signal() -> None:
    """Ask Linux to kill this process when its parent dies (a killed flow must not orphan it)."""
    with contextlib.suppress(OSError, AttributeError):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(job_dir: Path) -> int:
    """Unpickle the job, run it, write the outcome file; exit code 1 when the job raised."""
    _set_parent_death_signal()
    from prefect_azmanagers.detached.bundle import variablebundle

    outcome: dict[str, Any]
    try:
        job = cloudpickle.loads((job_dir / "payload.pkl").read_bytes())
        variablebundle.clear()
        variablebundle.update(job["variablebundle"])
        value = job["fn"](*job["args"], **job["kwargs"])
        outcome = {"ok": True, "pickle": cloudpickle.dumps(value)}
    except BaseException as exc:  # the job's own failure, reported, never re-raised here
        text = traceback.format_exc()
        sys.stderr.write(text)
        try:
            pickled = cloudpickle.dumps(exc)
        except Exception:
            pickled = None
        outcome = {"ok": False, "pickle": pickled, "traceback": text}
    sys.stdout.flush()
    sys.stderr.flush()
    (job_dir / "outcome.pkl").write_bytes(cloudpickle.dumps(outcome))
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
