"""The local cloud's token checks, unit by unit (the end-to-end path through the real SDK is in
test_credentials.py and tests/azure/test_credentials_e2e.py)."""

from __future__ import annotations

import time

import pytest

from prefect_azmanagers.localcloud import identity as identity_module
from prefect_azmanagers.localcloud.identity import Identity


@pytest.fixture
def identity() -> Identity:
    made = Identity.create()
    made.issuer_base = "https://127.0.0.1:9"
    return made


def _code(identity: Identity, token: str) -> str | None:
    refused = identity.authenticate(f"Bearer {token}")
    return None if refused is None else refused.code


def test_static_and_issued_tokens_pass_others_get_arms_codes(identity: Identity):
    assert _code(identity, identity.static_token) is None
    arm = identity.issue("https://management.azure.com", app_id="a", object_id="o")["access_token"]
    assert _code(identity, arm) is None
    assert _code(identity, "not-a-jwt") == "InvalidAuthenticationToken"
    storage = identity.issue("https://storage.azure.com", app_id="a", object_id="o")["access_token"]
    assert _code(identity, storage) == "InvalidAuthenticationTokenAudience"
    other = Identity.create()
    other.issuer_base = identity.issuer_base
    other.tenant_id = identity.tenant_id  # same issuer, another key
    foreign = other.issue("https://management.azure.com", app_id="a", object_id="o")["access_token"]
    refused = identity.authenticate(f"Bearer {foreign}")
    assert refused.code == "InvalidAuthenticationToken" and refused.message == "The access token has an invalid signature."
    assert identity.authenticate(None).code == "AuthenticationFailed"
    assert identity.authenticate("Basic abc").code == "AuthenticationFailed"


def test_an_expired_token_gets_expired_authentication_token(identity: Identity, monkeypatch):
    token = identity.issue("https://management.azure.com/", app_id="a", object_id="o")["access_token"]
    later = time.time() + identity_module.TOKEN_LIFETIME + 5
    monkeypatch.setattr(identity_module.time, "time", lambda: later)
    refused = identity.authenticate(f"Bearer {token}")
    assert refused.status == 401 and refused.code == "ExpiredAuthenticationToken"
    assert refused.message.startswith("The access token expiry UTC time '") and "is earlier than current UTC time" \
        in refused.message
    assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]


def test_the_client_secret_check_needs_both_values(identity: Identity):
    assert identity.client_secret_matches(identity.client_id, identity.client_secret)
    assert not identity.client_secret_matches(identity.client_id, identity.client_secret + "x")
    assert not identity.client_secret_matches("someone-else", identity.client_secret)
