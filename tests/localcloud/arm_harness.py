"""Helpers of the ARM conformance tests: static credentials for the real sync and aio Azure SDK
clients, a handle on the local cloud under test, and the stock OpenSSH client."""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.core.credentials import AccessToken
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient

from prefect_azmanagers.localcloud import LocalCloudAdmin

PAGE_SIZE = 2


class StaticCredential:
    """azure-identity has no static credential: this one returns the local cloud's token (its
    localcloud.json `static_token`, made at each start)."""

    def __init__(self, token: str):
        self.token = token

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


class AsyncStaticCredential(StaticCredential):
    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)

    async def close(self) -> None:
        pass


def bearer(info: dict[str, Any]) -> dict[str, str]:
    """The Authorization header of a raw request to the local cloud of `info`."""
    return {"Authorization": f"Bearer {info['static_token']}"}


@dataclass
class Cloud:
    info: dict[str, Any]
    admin: LocalCloudAdmin
    compute: ComputeManagementClient
    network: NetworkManagementClient

    @property
    def rg(self) -> str:
        return self.info["resource_group"]

    @property
    def location(self) -> str:
        return self.info["location"]

    def client_kwargs(self) -> dict[str, Any]:
        return dict(base_url=self.info["arm_endpoint"], connection_verify=self.info["ca_cert"], polling_interval=0)

    def aio_clients(self):
        """(compute, network) aio clients; use them as async context managers."""
        from azure.mgmt.compute.aio import ComputeManagementClient as AioCompute
        from azure.mgmt.network.aio import NetworkManagementClient as AioNetwork

        cred = AsyncStaticCredential(self.info["static_token"])
        sub = self.info["subscription_id"]
        return AioCompute(cred, sub, **self.client_kwargs()), AioNetwork(cred, sub, **self.client_kwargs())

    def public_key(self) -> str:
        return Path(self.info["ssh_public_key_file"]).read_text().strip()

    def ssh(self, ip: str, command: str, *, key: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `command` on an instance with the stock OpenSSH client and the manifest's key.

        A session that broke (ssh's own exit 255 with "Broken pipe", not the command's) is
        tried again, up to 3 times: once, on a loaded CI machine, one ended "client_loop: send
        disconnect: Broken pipe". Refused or unreachable instances are not tried again."""
        argv = ["ssh", "-i", key or self.info["ssh_private_key_file"], "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-p", str(self.info.get("ssh_port", 22)),
                f"azureuser@{ip}", command]
        for attempt in range(3):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            if done.returncode != 255 or "Broken pipe" not in done.stderr:
                break
            time.sleep(1 + attempt)
        return done

    def scale_set_body(self, capacity: int, *, custom_data: str | None = None, sku: str = "Standard_B1s",
                       **profile: Any) -> dict[str, Any]:
        """A camelCase VMSS body as the control plane sends it (extra profile keys merged in)."""
        os_profile: dict[str, Any] = {
            "computerNamePrefix": "conf", "adminUsername": "azureuser",
            "linuxConfiguration": {"disablePasswordAuthentication": True, "ssh": {"publicKeys": [
                {"path": "/home/azureuser/.ssh/authorized_keys", "keyData": self.public_key()}]}},
        }
        if custom_data is not None:
            os_profile["customData"] = custom_data
        orchestration = profile.pop("orchestrationMode", "Uniform")
        extra_props = profile.pop("properties", {})
        return {
            "location": self.location,
            "sku": {"name": sku, "tier": "Standard", "capacity": capacity},
            "tags": {"test": "conformance"},
            "properties": {
                "orchestrationMode": orchestration,
                **({"upgradePolicy": {"mode": "Manual"}} if orchestration == "Uniform" else {"platformFaultDomainCount": 1}),
                **extra_props,
                "virtualMachineProfile": {
                    "osProfile": os_profile,
                    "storageProfile": {"imageReference": {"publisher": "Canonical", "offer": "ubuntu-24_04-lts",
                                                          "sku": "server", "version": "latest"}},
                    "networkProfile": {"networkInterfaceConfigurations": [{"name": "nic0", "properties": {
                        "primary": True, "ipConfigurations": [{"name": "ip0", "properties": {
                            "subnet": {"id": self.subnet_id()}}}]}}]},
                    **profile,
                },
            },
        }

    def subnet_id(self) -> str:
        return (f"/subscriptions/{self.info['subscription_id']}/resourceGroups/{self.rg}/providers/"
                "Microsoft.Network/virtualNetworks/localcloud-vnet/subnets/default")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def nic_body(cloud: Cloud) -> dict[str, Any]:
    return {"location": cloud.location, "properties": {"enableAcceleratedNetworking": False, "ipConfigurations": [
        {"name": "ipConfig1", "properties": {"subnet": {"id": cloud.subnet_id()}}}]}}


def vm_body(cloud: Cloud, nic_id: str, computer_name: str, delete_option: str = "Delete", **props: Any) -> dict:
    return {
        "location": cloud.location,
        "tags": {"purpose": "detached"},
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_B1s"},
            "storageProfile": {"imageReference": {"publisher": "Canonical", "offer": "ubuntu", "sku": "server",
                                                  "version": "latest"},
                               "osDisk": {"createOption": "FromImage", "deleteOption": "Delete"}},
            "osProfile": {"computerName": computer_name, "adminUsername": "azureuser",
                          "linuxConfiguration": {"disablePasswordAuthentication": True, "ssh": {"publicKeys": [
                              {"path": "/home/azureuser/.ssh/authorized_keys", "keyData": cloud.public_key()}]}}},
            "networkProfile": {"networkInterfaces": [
                {"id": nic_id, "properties": {"primary": True, "deleteOption": delete_option}}]},
            **props,
        },
    }
