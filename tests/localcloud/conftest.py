"""Fixtures of the ARM conformance tests: a local cloud of their own (no Prefect server needed)
with small pages, and per-test restoration of faults, settings and quotas."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from arm_harness import PAGE_SIZE, Cloud, StaticCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient

from prefect_azmanagers.localcloud import LocalCloudAdmin, start, stop
from prefect_azmanagers.localcloud.config import LocalCloudConfig


@pytest.fixture(scope="session")
def arm_cloud():
    """A local cloud started through the library API, small pages so paging is exercised."""
    state_dir = Path(tempfile.mkdtemp(prefix="azm-arm-"))
    (state_dir / "config.json").write_text(json.dumps({"page_size": PAGE_SIZE, "eviction_notice": 30}))
    info = start(state_dir)
    admin = LocalCloudAdmin.from_info(info)
    kwargs = dict(base_url=info["arm_endpoint"], connection_verify=info["ca_cert"], polling_interval=0)
    compute = ComputeManagementClient(StaticCredential(info["static_token"]), info["subscription_id"], **kwargs)
    network = NetworkManagementClient(StaticCredential(info["static_token"]), info["subscription_id"], **kwargs)
    try:
        yield Cloud(info, admin, compute, network)
    finally:
        compute.close()
        network.close()
        admin.close()
        stop(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def cloud(arm_cloud: Cloud):
    """The session's local cloud with faults, settings and quotas restored after each test."""
    settings = arm_cloud.admin.status()["settings"]
    yield arm_cloud
    arm_cloud.admin.clear_faults()
    arm_cloud.admin.settings(**settings)
    for name, limit in LocalCloudConfig().quotas.items():
        arm_cloud.admin.set_quota(name, limit)
