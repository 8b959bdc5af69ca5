"""Fixtures for the control plane's end-to-end tests on the local cloud (real SDK, real SSH).

`lc` bundles what a test needs: the local cloud's manifest and templates (saved as blocks by
`localcloud start`), its admin client, a unique name prefix, and the steps most tests share
(clients, a scale set of the test, SSH to an instance, a quota changed for a while). After each
test it checks that the local cloud holds no scale set, instance or NIC the test created, and
clears faults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncssh
import pytest

from prefect_azmanagers.azure.bootscript import boot_script, encode_custom_data
from prefect_azmanagers.azure.clients import ArmClients
from prefect_azmanagers.azure.ownership import ownership_tags
from prefect_azmanagers.azure.provisioning import ProvisioningOptions
from prefect_azmanagers.azure.quota import usages
from prefect_azmanagers.azure.scaleset import ScaleSet

T = TypeVar("T")


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

    def custom_data(self, env: Mapping[str, str] | None = None, hooks: Sequence[str] = ()) -> str:
        """An encoded boot script for the local cloud's admin user."""
        return encode_custom_data(boot_script(admin_username=self.manifest.ssh_user, env=env, hooks=hooks))

    def scaleset(self, clients: ArmClients, suffix: str = "", **kw: Any) -> ScaleSet:
        """A ScaleSet from the small template, named and tagged for this test (nothing made yet)."""
        kw.setdefault("custom_data", self.custom_data())
        kw.setdefault("tags", ownership_tags(self.prefix))
        return ScaleSet(clients, self.manifest, self.sstemplate, self.name(suffix),
                        **with_provisioning(kw))

    async def ssh(self, ip: str) -> asyncssh.SSHClientConnection:
        """An SSH connection to an instance as the admin user (host key not checked)."""
        return await asyncssh.connect(
            ip, port=self.manifest.ssh_port, username=self.manifest.ssh_user, known_hosts=None,
            client_keys=[asyncssh.import_private_key(self.manifest.read_private_key())])

    def run(self, scenario: Callable[[ArmClients], Awaitable[T]]) -> T:
        """Run `scenario(clients)` to completion with clients for the local cloud; its result."""
        async def main() -> T:
            async with ArmClients(self.manifest) as clients:
                return await scenario(clients)
        return asyncio.run(main())

    def run_with_scaleset(self, scenario: Callable[[ArmClients, ScaleSet], Awaitable[None]], **kw: Any) -> None:
        """Run `scenario(clients, ss)` with `ss = self.scaleset(clients, **kw)`, deleted afterwards."""
        async def with_scaleset(clients: ArmClients) -> None:
            ss = self.scaleset(clients, **kw)
            try:
                await scenario(clients, ss)
            finally:
                await ss.delete()
        self.run(with_scaleset)

    @asynccontextmanager
    async def quota(self, clients: ArmClients, name: str, limit: int) -> AsyncIterator[int]:
        """The quota `name` ("cores", "lowPriorityCores"...) set to `limit` for the block; yields
        the limit it had, which is restored afterwards."""
        before = (await usages(clients, self.info["location"]))[name.lower()].limit
        self.admin.set_quota(name, limit)
        try:
            yield before
        finally:
            self.admin.set_quota(name, before)


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


def with_provisioning(kw: dict[str, Any]) -> dict[str, Any]:
    """ScaleSet keywords with the ProvisioningOptions fields among them gathered into one."""
    fields = {f.name for f in dataclasses.fields(ProvisioningOptions)}
    options = {k: kw.pop(k) for k in list(kw) if k in fields}
    return dict(kw, provisioning=ProvisioningOptions(**options)) if options else kw
