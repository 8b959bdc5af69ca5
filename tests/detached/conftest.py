"""Fixtures of the detached-run tests: a local process worker, detached VMs on the local cloud."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest


@pytest.fixture
def local_pool(prefect_server, tmp_path):
    """A work pool with the generic detached deployment, served by a real local process worker.

    Stands in for a detached VM where only the Prefect side is under test; yields a DetachedVM
    whose name is the pool (no VM behind it, so no SSH: payloads must stay inline).
    """
    from prefect_azmanagers.detached.vm import (
        DetachedVM, _create_pool_and_deployment, _delete_pool_and_deployments, wait_for_worker,
    )

    pool = f"local-{uuid.uuid4().hex[:8]}"
    _create_pool_and_deployment(pool)
    home = tmp_path / "home"
    home.mkdir()
    log = (tmp_path / "worker.log").open("wb")
    env = dict(os.environ, PREFECT_API_URL=prefect_server.api_url, HOME=str(home),
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_HEARTBEAT_SECONDS="5")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        assert wait_for_worker(pool, 120), (tmp_path / "worker.log").read_text()
        yield DetachedVM(name=pool, private_ip="127.0.0.1", vm_id="none", resource_group="none",
                         admin_username="none"), home
    finally:
        os.killpg(worker.pid, 15)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
            worker.wait()
        log.close()
        _delete_pool_and_deployments(pool)


@pytest.fixture(scope="module")
def detached_vm(localcloud):
    """One detached VM on the local cloud for a test module; removed (and checked gone) after."""
    from prefect_azmanagers.detached.vm import addproc, rmproc

    vm = addproc("localcloud-vm", "localcloud-nic", manifest="localcloud", basename="azmtest")
    try:
        yield vm
    finally:
        rmproc(vm)
