"""ArmClients: credential per manifest, and the retry policy's reach (POST/PATCH included)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from azure.core.pipeline.policies import AsyncRetryPolicy
from pydantic import SecretStr

from prefect_azmanagers.azure.clients import (
    ArmClients,
    IdempotentRetryPolicy,
    StaticTokenCredential,
    make_credential,
)
from prefect_azmanagers.exceptions import ConfigurationError


def manifest(**kw):
    base = dict(subscription_id="SUB", credential="static", static_token=SecretStr("tok"), tenant_id=None,
                client_id=None, client_secret=None, arm_endpoint="https://127.0.0.1:1", ca_bundle=None)
    return SimpleNamespace(**{**base, **kw})


def test_static_credential_returns_the_token():
    credential = make_credential(manifest())
    assert isinstance(credential, StaticTokenCredential)
    token = asyncio.run(credential.get_token("https://management.azure.com/.default"))
    assert token.token == "tok" and token.expires_on > 0


def test_client_secret_and_default_credentials():
    from azure.identity.aio import ClientSecretCredential, DefaultAzureCredential

    secret = manifest(credential="client_secret", tenant_id="t", client_id="c", client_secret=SecretStr("s"))
    assert isinstance(make_credential(secret), ClientSecretCredential)
    assert isinstance(make_credential(manifest(credential="default")), DefaultAzureCredential)


@pytest.mark.parametrize("kw, words", [
    (dict(static_token=None), "no static_token"),
    (dict(credential="client_secret"), "tenant_id, client_id, client_secret"),
    (dict(credential="kerberos"), "Unknown manifest credential"),
])
def test_credential_errors_say_what_to_set(kw, words):
    with pytest.raises(ConfigurationError, match=words):
        make_credential(manifest(**kw))


def test_missing_subscription_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="No subscription id"):
        ArmClients(manifest(subscription_id=""))


def test_retry_policy_covers_post_and_patch():
    stock = AsyncRetryPolicy().configure_retries({})["methods"]
    ours = IdempotentRetryPolicy().configure_retries({})["methods"]
    assert "POST" not in stock and "PATCH" not in stock
    assert {"GET", "PUT", "DELETE", "POST", "PATCH"} <= set(ours)


def test_clients_close_cleanly():
    async def scenario():
        async with ArmClients(manifest()) as clients:
            assert clients.subscription_id == "SUB"
            assert clients.compute is not None and clients.network is not None
    asyncio.run(scenario())
