"""Fixtures for the control plane's end-to-end tests on the local cloud (real SDK, real SSH).

`lc` bundles what a test needs: the local cloud's manifest and templates (saved as blocks by
`localcloud start`), its admin client, and a unique name prefix. After each test it checks that
the local cloud holds no scale set, instance or NIC the test created, and clears faults.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class LocalCloud:
    info: dict
    manifest: Any
    sstemplate: Any
    vmtemplate: Any
    nictemplate: Any
    admin: Any
    prefix: str

    def name(self, suffix: str = "") -> str:
        return f"{self.prefix}{suffix}"

    def leftovers(self) -> list[str]:
        """Everything in the local cloud whose name carries this test's prefix."""
        status = self.admin.status()
        found = [f"scale set {s['name']}" for s in status["scale_sets"] if s["name"].startswith(self.prefix)]
        found += [f"instance {i['name']}" for i in status["instances"] if i["name"].startswith(self.prefix)]
        return found


@pytest.fixture(scope="session")
def _localcloud_blocks(localcloud):
    from prefect_azmanagers.blocks import (
        load_manifest,
        load_nic_template,
        load_scaleset_template,
        load_vm_template,
    )

    return (load_manifest("localcloud"), load_scaleset_template("localcloud-small"),
            load_vm_template("localcloud-vm"), load_nic_template("localcloud-nic"))


@pytest.fixture
def lc(localcloud, _localcloud_blocks):
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    manifest, sstemplate, vmtemplate, nictemplate = _localcloud_blocks
    with LocalCloudAdmin.from_info(localcloud) as admin:
        admin.clear_faults()
        nics_before = admin.status()["nics"]
        cloud = LocalCloud(localcloud, manifest, sstemplate, vmtemplate, nictemplate, admin,
                           f"t{uuid.uuid4().hex[:5]}")
        try:
            yield cloud
        finally:
            admin.clear_faults()
            leftovers = cloud.leftovers()
            nics_after = admin.status()["nics"]
        assert not leftovers, f"the test left {leftovers} in the local cloud"
        assert nics_after == nics_before, f"the test left {nics_after - nics_before} NIC(s)"

