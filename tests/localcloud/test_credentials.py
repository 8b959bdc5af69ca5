"""The local cloud requires its credential: a random token per start, checked in constant time by
the ARM endpoint and the admin API; any other token gets ARM's 401 (through the real SDK)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from arm_harness import AsyncStaticCredential, Cloud, StaticCredential, bearer, nic_body, unique, vm_body
from azure.core.exceptions import ClientAuthenticationError
from azure.mgmt.compute import ComputeManagementClient
from loopback_harness import as_user

from prefect_azmanagers.localcloud import AdminError, LocalCloudAdmin


def _assert_arm_401(exc: ClientAuthenticationError, code: str, message: str, description: str) -> None:
    """The body and headers ARM sends for a refused token."""
    assert exc.status_code == 401
    assert exc.error.code == code and exc.error.message == message
    headers = exc.response.headers
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer authorization_uri="https://127.0.0.1:')
    assert f'error="invalid_token", error_description="{description}"' in challenge
    assert headers["x-ms-failure-cause"] == "gateway"


def test_each_start_makes_a_secret_token_kept_0600(cloud: Cloud):
    state_dir = Path(cloud.info["state_dir"])
    info_file = state_dir / "localcloud.json"
    assert stat.S_IMODE(info_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    token = json.loads(info_file.read_text())["static_token"]
    assert len(token) >= 32 and token != "localcloud"
    assert token not in (state_dir / "localcloud.log").read_text()  # never logged


def test_a_wrong_token_gets_arms_401_through_the_sdk(cloud: Cloud):
    wrong = cloud.info["static_token"][:-1] + ("x" if cloud.info["static_token"][-1] != "x" else "y")
    compute = ComputeManagementClient(StaticCredential(wrong), cloud.info["subscription_id"], **cloud.client_kwargs())
    with compute, pytest.raises(ClientAuthenticationError) as refused:
        list(compute.virtual_machine_scale_sets.list(cloud.rg))
    _assert_arm_401(refused.value, "InvalidAuthenticationToken", "The access token is invalid.",
                    "The access token is invalid.")

    from azure.mgmt.compute.aio import ComputeManagementClient as AioCompute

    async def aio() -> ClientAuthenticationError:
        async with AioCompute(AsyncStaticCredential(wrong), cloud.info["subscription_id"],
                              **cloud.client_kwargs()) as aio_compute:
            with pytest.raises(ClientAuthenticationError) as aio_refused:
                await aio_compute.virtual_machines.get(cloud.rg, "nosuchvm")
            return aio_refused.value

    _assert_arm_401(asyncio.run(aio()), "InvalidAuthenticationToken", "The access token is invalid.",
                    "The access token is invalid.")
    # and the right one passes (the same call, the same client type)
    right = ComputeManagementClient(StaticCredential(cloud.info["static_token"]), cloud.info["subscription_id"],
                                    **cloud.client_kwargs())
    with right:
        assert isinstance(list(right.virtual_machine_scale_sets.list(cloud.rg)), list)


def test_no_authorization_header_gets_arms_401(cloud: Cloud):
    verify = ssl.create_default_context(cafile=cloud.info["ca_cert"])
    url = f"{cloud.info['arm_endpoint']}/subscriptions/{cloud.info['subscription_id']}/providers/Microsoft.Compute/skus"
    anonymous = httpx.get(url, params={"api-version": "2021-07-01"}, verify=verify)
    assert anonymous.status_code == 401
    assert anonymous.json() == {"error": {"code": "AuthenticationFailed",
                                          "message": "Authentication failed. The 'Authorization' header is missing."}}
    assert anonymous.headers["WWW-Authenticate"].endswith(
        'error="invalid_token", error_description="The authentication failed because of missing '
        "'Authorization' header.\"")
    assert httpx.get(url, params={"api-version": "2021-07-01"}, headers=bearer(cloud.info),
                     verify=verify).status_code == 200


def test_the_admin_api_needs_the_token_too(cloud: Cloud):
    stranger = LocalCloudAdmin(cloud.info["admin_endpoint"], cloud.info["ca_cert"], "guessed")
    with stranger, pytest.raises(AdminError, match="needs the local cloud's token"):
        stranger.fail_next_lro()
    assert cloud.admin.status()["faults"]["allocation_failures"] == 0


ATTACK = textwrap.dedent("""
    import json, sys, time
    from azure.core.credentials import AccessToken
    from azure.core.exceptions import ClientAuthenticationError
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.network import NetworkManagementClient

    info_path, endpoint, sub, rg, nic_body, vm_body = sys.argv[1:7]
    try:
        token = json.load(open(info_path))["static_token"]
        print("READ localcloud.json")
    except PermissionError:
        token = "localcloud"  # the token every local cloud used to accept
    class Cred:
        def get_token(self, *scopes, **kw):
            return AccessToken(token, int(time.time()) + 3600)
    kw = dict(base_url=endpoint, connection_verify=False, polling_interval=0)
    network = NetworkManagementClient(Cred(), sub, **kw)
    compute = ComputeManagementClient(Cred(), sub, **kw)
    try:
        nic = network.network_interfaces.begin_create_or_update(rg, "intruder-nic", json.loads(nic_body)).result()
        compute.virtual_machines.begin_create_or_update(rg, "intruder", json.loads(vm_body)).result()
        print("CREATED")
    except ClientAuthenticationError as exc:
        print("REFUSED", exc.status_code, exc.error.code)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user (nobody)")
def test_another_local_user_cannot_create_vms(cloud: Cloud):
    """A process of another user (nobody) cannot read localcloud.json, and the token it can
    guess is refused: no NIC, no VM (whose customData would run as root)."""
    nic_id = (f"/subscriptions/{cloud.info['subscription_id']}/resourceGroups/{cloud.rg}/providers/"
              "Microsoft.Network/networkInterfaces/intruder-nic")
    body = vm_body(cloud, nic_id, unique("intr"))
    with as_user(65534, 65534) as argv:   # nobody, able to run this interpreter wherever it lives
        ran = subprocess.run(
            argv([sys.executable, "-c", ATTACK,
                  str(Path(cloud.info["state_dir"]) / "localcloud.json"), cloud.info["arm_endpoint"],
                  cloud.info["subscription_id"], cloud.rg, json.dumps(nic_body(cloud)), json.dumps(body)]),
            capture_output=True, text=True, timeout=120, cwd="/", env={"PATH": os.environ["PATH"], "HOME": "/"})
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "READ" not in ran.stdout
    assert "REFUSED 401 InvalidAuthenticationToken" in ran.stdout, ran.stdout + ran.stderr[-2000:]
    assert "intruder" not in {i["name"] for i in cloud.admin.status()["instances"]}
    assert "intruder-nic" not in {n.name for n in cloud.network.network_interfaces.list(cloud.rg)}
