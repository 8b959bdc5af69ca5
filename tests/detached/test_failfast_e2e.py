"""Detached VMs whose worker can never serve fail fast, end to end on the local cloud.

addproc must not wait out `worker_timeout` when the VM's Prefect worker cannot reach the Prefect
API or keeps exiting: it finds out from the VM (boot status, worker log, a probe of the API run
on the VM), raises an error that says what is wrong and which setting fixes it, and deletes
everything it made (ARM VM and NIC, local-cloud instance, work pool, deployment). The timeout
given here is far above what the checks need: an addproc that waits it out raises BootFailed
("did not come online within"), which these tests refuse.
"""

from __future__ import annotations

import time

import pytest

from prefect_azmanagers.blocks import load_manifest
from prefect_azmanagers.detached import addproc, detach
from prefect_azmanagers.detached.signing import DRIVER_KEY_DIR
from prefect_azmanagers.exceptions import BootFailed, PrefectAPIUnreachable

pytestmark = pytest.mark.e2e
WORKER_TIMEOUT = 480  # below pytest's 600 s: today's code fails with BootFailed at it
# Fail fast means well before the worker timeout, not quickly on a loaded machine: measured
# 6-30 s to the error, bounded at half the timeout (detach's default timeout is 600 s).
FAIL_FAST_BOUND = WORKER_TIMEOUT / 2


def _assert_nothing_left(name: str, assert_vm_gone) -> None:
    """Nothing in ARM, the local cloud or Prefect (`assert_vm_gone`), and no job key here."""
    assert_vm_gone(name, timeout=60)
    assert list(DRIVER_KEY_DIR.expanduser().glob(f"{name}.*")) == []


def _timed_addproc(manifest, name: str, via: str = "addproc", **options):
    """addproc (with `options`) or detach, which must fail; prints the time to its error and
    asserts it came within FAIL_FAST_BOUND."""
    started = time.monotonic()
    try:
        if via == "addproc":
            addproc("localcloud-vm", "localcloud-nic", manifest=manifest, name=name,
                    worker_timeout=WORKER_TIMEOUT, **options)
        else:   # detach's own addproc, with the default worker_timeout (600 s)
            detach(print, "never runs", vm_template="localcloud-vm", nic_template="localcloud-nic",
                   manifest=manifest, name=name, persist=False)
    except Exception as exc:
        elapsed = time.monotonic() - started
        print(f"addproc {name}: {elapsed:.1f} s to {type(exc).__name__}: {exc}")
        assert elapsed < FAIL_FAST_BOUND, f"{name} failed after {elapsed:.0f} s, not fast: {exc}"
        raise


@pytest.mark.parametrize("via", ["addproc", "detach"])
def test_worker_that_cannot_reach_the_api_fails_fast_and_leaves_nothing(localcloud, assert_vm_gone,
                                                                        via):
    # A closed port of the VM's own loopback (its network namespace): nothing answers there.
    manifest = load_manifest("localcloud").model_copy(
        update={"prefect_api_url_for_vms": "http://127.0.0.1:9/api"})
    name = f"azmnoapi-{via}"
    with pytest.raises(PrefectAPIUnreachable) as info:
        _timed_addproc(manifest, name, via)
    message = str(info.value)
    assert "http://127.0.0.1:9/api" in message and name in message
    assert "prefect_api_url_for_vms" in message and "localcloud start --prefect-api-url" in message
    assert "Connection refused" in message or "ConnectionRefused" in message, message
    _assert_nothing_left(name, assert_vm_gone)


def test_worker_that_keeps_exiting_fails_fast_and_leaves_nothing(localcloud, assert_vm_gone):
    # The image's own Python, without Prefect: `python -m prefect worker start` exits at once,
    # and the VM's restart loop starts it again and again.
    manifest = load_manifest("localcloud").model_copy(update={"python": "/usr/bin/python3"})
    with pytest.raises(BootFailed) as info:
        _timed_addproc(manifest, "azmexits-1")
    message = str(info.value)
    assert "keeps exiting" in message and "azmexits-1" in message, message
    assert "No module named prefect" in message  # the worker log's own words
    assert "python" in message and "/usr/bin/python3" in message and "customenv" in message
    _assert_nothing_left("azmexits-1", assert_vm_gone)


def test_a_failed_boot_script_fails_fast_and_leaves_nothing(localcloud, assert_vm_gone):
    # customenv builds its venv with the manifest's python, which the VM does not have: the
    # boot script fails (boot.status "failed: ..."), so the worker is never started.
    manifest = load_manifest("localcloud").model_copy(update={"python": "/nonexistent/python3"})
    with pytest.raises(BootFailed) as info:
        _timed_addproc(manifest, "azmbootsts-1", customenv=True)
    message = str(info.value)
    assert "The boot script of detached VM azmbootsts-1 failed (failed: exit" in message, message
    assert "/nonexistent/python3" in message   # the boot log's own words
    _assert_nothing_left("azmbootsts-1", assert_vm_gone)
