"""`detach`: a new detached VM for one job; with persist=False the VM is deleted afterwards.

The deletion is done by a reaper, `python -m prefect_azmanagers.detached.detach`, which
`detach` starts in a new session (so it outlives the Python process, notebook or terminal that
called `detach`; its log is `~/.azmanagers/reaper.log`). It reads the VM, the manifest and the
job's flow-run id cloudpickled on its stdin (no credential on a command line), waits for the
job's final state through the Prefect API, then `rmproc`s the VM (VM, NIC, deployment, pool).
It gives up waiting after `max_wait` seconds or when the API has been unreachable for
`api_patience` seconds, and deletes the VM anyway.

Why not the VM deleting itself, as AzManagers intended: the VM would need an ARM credential
(a secret shipped to it, or a managed identity) and a route to ARM, and the local cloud's VMs,
like VMs in a locked-down VNet, reach only the Prefect API. The limit of this design: the
machine that called `detach` must stay up (a closed laptop lid suspends, then resumes, the
reaper; a shut-down laptop leaves the VM, tagged kind "detached", for
`prefect-azmanagers cleanup` or `vm rm`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

from prefect_azmanagers.blocks import AzureManifest, load_manifest
from prefect_azmanagers.detached.job import FINAL_STATUSES, DetachedJob, detachat
from prefect_azmanagers.detached.vm import DetachedVM, addproc, rmproc

REAPER_LOG = Path("~/.azmanagers/reaper.log")


def _api_environment() -> dict[str, str]:
    """This process's environment plus the Prefect API settings in effect (maybe from a profile)."""
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value() or "")
    if PREFECT_API_KEY.value():
        env["PREFECT_API_KEY"] = PREFECT_API_KEY.value()
    return env


def start_reaper(vm: DetachedVM, job: DetachedJob, manifest: AzureManifest, *,
                 max_wait: float = 7 * 24 * 3600, api_patience: float = 3600) -> int:
    """Start the reaper process for `job` on `vm`; returns its pid."""
    log = REAPER_LOG.expanduser()
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with log.open("ab") as out:
        reaper = subprocess.Popen(
            [sys.executable, "-m", "prefect_azmanagers.detached.detach"],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=_api_environment())
    reaper.stdin.write(cloudpickle.dumps({"vm": vm, "job": job.flow_run_id, "manifest": manifest,
                                          "max_wait": max_wait, "api_patience": api_patience}))
    reaper.stdin.close()
    return reaper.pid


def detach(fn: Callable[..., Any], /, *args: Any, vm_template: str | Any,
           nic_template: str | Any | None = None, persist: bool = True,
           manifest: str | AzureManifest = "default", name: str | None = None,
           basename: str = "azm", customenv: bool = False, **kwargs: Any) -> DetachedJob:
    """Create a detached VM (`addproc`) and run `fn(*args, **kwargs)` on it (`detachat`).

    With `persist=False` the VM, its NIC and work pool are deleted when the job ends, also
    after this process has exited (see the module docstring for how). The keywords above are
    detach's own; the others go to `fn`.
    """
    manifest_block = load_manifest(manifest)
    vm = addproc(vm_template, nic_template, name=name, basename=basename, customenv=customenv,
                 manifest=manifest if isinstance(manifest, str) else manifest_block)
    try:
        job = detachat(vm, fn, *args, **kwargs)
        if not persist:
            start_reaper(vm, job, manifest_block)
    except BaseException:
        if not persist:
            rmproc(vm, manifest=manifest_block)
        raise
    return job


def _wait_for_end(job: DetachedJob, max_wait: float, api_patience: float) -> str:
    deadline = time.monotonic() + max_wait
    last_contact = time.monotonic()
    while time.monotonic() < deadline:
        try:
            status = job.status()
            last_contact = time.monotonic()
            if status in FINAL_STATUSES:
                return status
        except Exception as exc:  # the API is down: keep trying for a while
            if time.monotonic() - last_contact > api_patience:
                return f"unknown (Prefect API unreachable: {exc})"
        time.sleep(5)
    return f"unknown (still running after {max_wait:.0f} s)"


def main() -> None:
    order = cloudpickle.loads(sys.stdin.buffer.read())
    job = DetachedJob(order["job"])
    status = _wait_for_end(job, order["max_wait"], order["api_patience"])
    print(f"job {job.flow_run_id} ended {status}; deleting detached VM {order['vm'].name}",
          flush=True)
    rmproc(order["vm"], manifest=order["manifest"])
    print(f"deleted detached VM {order['vm'].name}", flush=True)


if __name__ == "__main__":
    main()
