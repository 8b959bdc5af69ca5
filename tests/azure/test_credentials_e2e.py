"""Each credential choice of the manifest, end to end on the local cloud with the real SDK:
"static" (its token), "client_secret" and "default" (its Entra-compatible token endpoint, through
azure-identity's authority host), "managed_identity" and "default" on a VM (IMDS); and ARM refuses
tokens the local cloud did not sign or issued for another audience."""

from __future__ import annotations

import asyncio
import base64
import json
import shlex
import textwrap

import pytest
from azure.core.exceptions import ClientAuthenticationError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import SecretStr

from prefect_azmanagers.azure.clients import ArmClients, make_credential

pytestmark = pytest.mark.e2e

ARM_SCOPE = "https://management.azure.com/.default"


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def _token(manifest, scope: str = ARM_SCOPE) -> str:
    credential = make_credential(manifest)
    try:
        return (await credential.get_token(scope)).token
    finally:
        await credential.close()


def _list_scale_sets(lc, manifest) -> list:
    async def main() -> list:
        async with ArmClients(manifest) as clients:
            return [s async for s in clients.compute.virtual_machine_scale_sets.list(manifest.resource_group)]
    return asyncio.run(main())


def _refusal(lc, token: str) -> ClientAuthenticationError:
    """What ARM answers a scale-set list made with `token` (through the SDK)."""
    with pytest.raises(ClientAuthenticationError) as refused:
        _list_scale_sets(lc, lc.manifest.model_copy(update={"credential": "static", "static_token": SecretStr(token)}))
    return refused.value


def test_static_and_client_secret_reach_arm(lc):
    assert isinstance(_list_scale_sets(lc, lc.manifest.model_copy(update={"credential": "static"})), list)
    spn = lc.manifest.model_copy(update={"credential": "client_secret"})
    token = asyncio.run(_token(spn))
    claims = _claims(token)  # a JWT the local cloud's token endpoint issued to its service principal
    assert claims["tid"] == lc.info["tenant_id"] and claims["azp"] == lc.info["client_id"]
    assert claims["aud"] == "https://management.azure.com" and claims["iss"].startswith(lc.info["authority_host"])
    assert isinstance(_list_scale_sets(lc, spn), list)
    # the sync SDK: azure-identity's ClientSecretCredential goes through MSAL (OpenID discovery first)
    from azure.identity import ClientSecretCredential
    from azure.mgmt.compute import ComputeManagementClient

    sync_credential = ClientSecretCredential(
        lc.info["tenant_id"], lc.info["client_id"], lc.info["client_secret"], authority=lc.info["authority_host"],
        disable_instance_discovery=True, connection_verify=lc.info["ca_cert"])
    with ComputeManagementClient(sync_credential, lc.info["subscription_id"], base_url=lc.info["arm_endpoint"],
                                 connection_verify=lc.info["ca_cert"]) as compute:
        assert isinstance(list(compute.virtual_machine_scale_sets.list(lc.manifest.resource_group)), list)


def test_default_credential_from_the_environment(lc, monkeypatch):
    """DefaultAzureCredential offline: its EnvironmentCredential takes the service principal
    from AZURE_*; only it is tried (AZURE_TOKEN_CREDENTIALS), so nothing asks a real IMDS."""
    monkeypatch.setenv("AZURE_TENANT_ID", lc.info["tenant_id"])
    monkeypatch.setenv("AZURE_CLIENT_ID", lc.info["client_id"])
    monkeypatch.setenv("AZURE_CLIENT_SECRET", lc.info["client_secret"])
    monkeypatch.setenv("AZURE_TOKEN_CREDENTIALS", "EnvironmentCredential")
    default = lc.manifest.model_copy(update={"credential": "default", "tenant_id": None, "client_id": None,
                                             "client_secret": None})
    assert _claims(asyncio.run(_token(default)))["azp"] == lc.info["client_id"]
    assert isinstance(_list_scale_sets(lc, default), list)


def test_a_wrong_client_secret_is_refused_by_the_token_endpoint(lc):
    wrong = lc.manifest.model_copy(update={"credential": "client_secret", "client_secret": SecretStr("nope")})
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215: Invalid client secret provided"):
        asyncio.run(_token(wrong))


def test_arm_accepts_only_tokens_it_issued_for_arm(lc):
    spn = lc.manifest.model_copy(update={"credential": "client_secret"})
    real = asyncio.run(_token(spn))
    # the same claims, signed by a key that is not the local cloud's
    head, body, _ = real.split(".")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged_sig = other.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    forged = f"{head}.{body}.{base64.urlsafe_b64encode(forged_sig).rstrip(b'=').decode()}"
    refused = _refusal(lc, forged)
    assert refused.status_code == 401 and refused.error.code == "InvalidAuthenticationToken"
    assert refused.error.message == "The access token has an invalid signature."
    assert 'error="invalid_token"' in refused.response.headers["WWW-Authenticate"]
    # a genuine token, for another resource
    storage = asyncio.run(_token(spn, "https://storage.azure.com/.default"))
    refused = _refusal(lc, storage)
    assert refused.error.code == "InvalidAuthenticationTokenAudience"
    assert "wrong audience or resource 'https://storage.azure.com'" in refused.error.message


MI_SCRIPT = textwrap.dedent("""
    import asyncio
    from types import SimpleNamespace
    from prefect_azmanagers.azure.clients import make_credential

    async def main():
        for kind in ("managed_identity", "default"):  # default: its chain reaches the VM's IMDS
            credential = make_credential(SimpleNamespace(credential=kind, client_id=None, authority_host=None,
                                                         ca_bundle=None))
            try:
                print(kind.upper(), "TOKEN", (await credential.get_token("https://management.azure.com/.default")).token)
            except Exception as exc:
                print(kind.upper(), "FAILED", type(exc).__name__, str(exc).replace("\\n", " "))
            finally:
                await credential.close()

    asyncio.run(main())
""")


def _vm_body(lc, nic_id: str, computer_name: str, identity: dict | None) -> dict:
    m = lc.manifest
    body = {
        "location": m.location,
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_B1s"},
            "storageProfile": {"imageReference": {"publisher": "Canonical", "offer": "ubuntu", "sku": "server",
                                                  "version": "latest"}},
            "osProfile": {"computerName": computer_name, "adminUsername": m.ssh_user,
                          "linuxConfiguration": {"disablePasswordAuthentication": True, "ssh": {"publicKeys": [
                              {"path": f"/home/{m.ssh_user}/.ssh/authorized_keys", "keyData": m.read_public_key()}]}}},
            "networkProfile": {"networkInterfaces": [{"id": nic_id, "properties": {"deleteOption": "Delete"}}]},
        },
    }
    if identity is not None:
        body["identity"] = identity
    return body


def test_managed_identity_on_a_vm(lc):
    """A VM with a SystemAssigned identity gets a token from its IMDS (the manifest's
    'managed_identity', run on the VM), and ARM accepts it; a VM without one is told so."""
    m = lc.manifest
    subnet = (f"/subscriptions/{m.subscription_id}/resourceGroups/{m.resource_group}/providers/"
              "Microsoft.Network/virtualNetworks/localcloud-vnet/subnets/default")

    async def scenario(clients: ArmClients) -> dict[str, str]:
        made, out = [], {}
        try:
            for suffix, identity in (("mi", {"type": "SystemAssigned"}), ("none", None)):
                name = lc.name(suffix)
                nic = await (await clients.network.network_interfaces.begin_create_or_update(
                    m.resource_group, f"{name}-nic", {"location": m.location, "properties": {"ipConfigurations": [
                        {"name": "ipconfig1", "properties": {"subnet": {"id": subnet}}}]}})).result()
                await (await clients.compute.virtual_machines.begin_create_or_update(
                    m.resource_group, name, _vm_body(lc, nic.id, name, identity))).result()
                made.append(name)
                vm = await clients.compute.virtual_machines.get(m.resource_group, name)
                ip = (await clients.network.network_interfaces.get(m.resource_group, f"{name}-nic")) \
                    .ip_configurations[0].private_ip_address
                async with await lc.ssh(ip) as conn:
                    ran = await conn.run(f"{shlex.quote(m.python)} -c {shlex.quote(MI_SCRIPT)}", timeout=120)
                out[suffix] = ran.stdout + ran.stderr
                out[f"{suffix}-principal"] = vm.identity.principal_id if vm.identity else None
                out[f"{suffix}-tenant"] = vm.identity.tenant_id if vm.identity else None
        finally:
            for name in made:
                await (await clients.compute.virtual_machines.begin_delete(m.resource_group, name)).result()
        return out

    out = lc.run(scenario)
    assert "MANAGED_IDENTITY FAILED CredentialUnavailableError" in out["none"], out["none"]
    assert "Identity not found" in out["none"] and out["none-principal"] is None
    tokens = dict(line.split(" TOKEN ") for line in out["mi"].splitlines() if " TOKEN " in line)
    assert set(tokens) == {"MANAGED_IDENTITY", "DEFAULT"}, out["mi"]
    token = tokens["MANAGED_IDENTITY"]
    claims = _claims(token)
    assert _claims(tokens["DEFAULT"])["oid"] == claims["oid"]
    assert claims["oid"] == out["mi-principal"] and out["mi-tenant"] == lc.info["tenant_id"]
    assert claims["xms_mirid"].endswith(f"/virtualMachines/{lc.name('mi')}")
    # the VM's token is good for ARM (the driver uses it here: an isolated VM cannot reach ARM)
    with_vm_token = m.model_copy(update={"credential": "static", "static_token": SecretStr(token)})
    assert isinstance(_list_scale_sets(lc, with_vm_token), list)
