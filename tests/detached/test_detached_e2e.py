"""Detached runs end to end on the local cloud: real VMs (sandboxes reached over OpenSSH), the
real Azure SDK against the local ARM endpoint, a real Prefect server, the Prefect worker that
the VM's boot script starts, and jobs submitted with detachat/detach.
"""

from __future__ import annotations

import pytest

from prefect_azmanagers.detached import DetachedJob, detachat, rmproc
from prefect_azmanagers.detached.vm import DetachedVM

pytestmark = pytest.mark.e2e


def hello(n):
    import sys
    print(f"hello {n} from the VM")
    print("a warning", file=sys.stderr)
    return n * 2


def test_addproc_detachat_read_result(detached_vm):
    vm = detached_vm
    assert DetachedVM.from_name(vm.name, manifest="localcloud") == vm
    job = detachat(vm, hello, 21)
    assert job.wait(timeout=300) == "done"
    assert job.result() == 42
    assert job.read() == "hello 21 from the VM\n"
    assert job.read("stderr") == "a warning\n"
