"""Who may call the local cloud: its credentials, the tokens it issues and how it checks them.

Each start makes fresh credentials (`Identity.create()`), kept in localcloud.json (0600) and in
the saved `localcloud` manifest:
- a static bearer token (the manifest's credential "static"; also the admin API's credential);
- a service principal (tenant id, client id, client secret) whose client-credentials grant the
  Microsoft Entra-compatible token endpoint (entra.py) answers with a JWT;
- managed identities: an instance with a SystemAssigned identity gets a JWT from its IMDS.

ARM accepts the static token (compared in constant time) or a JWT this local cloud signed
(RS256, with a key that lives only in its process), for the ARM audience and not expired; any
other token gets ARM's 401 (exceptions.py: `authentication_missing` / `invalid_token`), so
another user of the machine (who cannot read localcloud.json) cannot create VMs whose customData
runs as root.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from prefect_azmanagers.localcloud import exceptions as errors

# The audiences ARM accepts (as its InvalidAuthenticationTokenAudience message lists them).
ARM_AUDIENCES = ("https://management.core.windows.net/", "https://management.core.windows.net",
                 "https://management.azure.com/", "https://management.azure.com")
TOKEN_LIFETIME = 3600  # seconds (Entra's access tokens live 60-90 minutes)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Identity:
    """The local cloud's credentials and token signing key (one per start)."""

    tenant_id: str
    client_id: str
    client_secret: str
    static_token: str
    key: rsa.RSAPrivateKey = field(repr=False)
    kid: str = field(default_factory=lambda: secrets.token_hex(8))
    issuer_base: str = ""  # https://127.0.0.1:PORT, set once the endpoint listens

    @classmethod
    def create(cls) -> Identity:
        return cls(tenant_id=str(uuid.uuid4()), client_id=str(uuid.uuid4()),
                   client_secret=secrets.token_urlsafe(32), static_token=secrets.token_urlsafe(32),
                   key=rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @property
    def authority(self) -> str:
        """The tenant's authority (what ARM's 401 challenge names as the authorization_uri)."""
        return f"{self.issuer_base}/{self.tenant_id}"

    @property
    def issuer(self) -> str:
        return f"{self.authority}/v2.0"

    def info(self) -> dict[str, str]:
        """The fields localcloud.json (and the manifest) carry."""
        return {"static_token": self.static_token, "tenant_id": self.tenant_id, "client_id": self.client_id,
                "client_secret": self.client_secret, "authority_host": self.issuer_base}

    # ----- issuing -----------------------------------------------------------------------
    def issue(self, audience: str, *, app_id: str, object_id: str, extra: dict[str, Any] | None = None) -> dict:
        """A signed access token for `audience`, in Entra's v2.0 app-token claim names."""
        now = int(time.time())
        claims = {"aud": audience, "iss": self.issuer, "iat": now, "nbf": now, "exp": now + TOKEN_LIFETIME,
                  "azp": app_id, "azpacr": "1", "idtyp": "app", "oid": object_id, "sub": object_id,
                  "tid": self.tenant_id, "ver": "2.0", "uti": _b64(secrets.token_bytes(16)), **(extra or {})}
        header = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return {"access_token": f"{signing_input}.{_b64(signature)}", "expires_on": claims["exp"],
                "not_before": now, "expires_in": TOKEN_LIFETIME}

    def managed_identity_token(self, resource: str, *, principal_id: str, client_id: str,
                               resource_id: str) -> dict[str, str]:
        """An instance's managed-identity token, as IMDS's /metadata/identity/oauth2/token
        answers it (its numbers are strings there)."""
        issued = self.issue(resource, app_id=client_id, object_id=principal_id, extra={"xms_mirid": resource_id})
        return {"access_token": issued["access_token"], "client_id": client_id,
                "expires_in": str(issued["expires_in"]), "expires_on": str(issued["expires_on"]),
                "ext_expires_in": str(issued["expires_in"]), "not_before": str(issued["not_before"]),
                "resource": resource, "token_type": "Bearer"}

    def jwks(self) -> dict[str, Any]:
        """The signing key as a JSON Web Key Set (what Entra's jwks_uri serves)."""
        numbers = self.key.public_key().public_numbers()
        as_bytes = lambda n: n.to_bytes((n.bit_length() + 7) // 8, "big")  # noqa: E731
        return {"keys": [{"kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid,
                          "n": _b64(as_bytes(numbers.n)), "e": _b64(as_bytes(numbers.e)), "issuer": self.issuer}]}

    def client_secret_matches(self, client_id: str, secret: str) -> bool:
        return (hmac.compare_digest(client_id.encode(), self.client_id.encode())
                & hmac.compare_digest(secret.encode(), self.client_secret.encode()))

    # ----- checking ----------------------------------------------------------------------
    def is_static_token(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries the static token (constant time)."""
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.static_token.encode())

    def authenticate(self, authorization: str | None) -> errors.ArmError | None:
        """None if ARM accepts this Authorization header, else the 401 ARM answers."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return errors.authentication_missing(self.authority)
        if self.is_static_token(authorization):
            return None
        token = authorization.split(" ", 1)[1].strip()
        try:
            claims = self._verified_claims(token)
        except ValueError as exc:
            return errors.invalid_token(self.authority, str(exc))
        now = time.time()
        if claims.get("exp", 0) <= now:
            return errors.expired_token(self.authority, claims.get("exp", 0), now)
        if claims.get("aud") not in ARM_AUDIENCES:
            return errors.wrong_audience(self.authority, str(claims.get("aud")), ARM_AUDIENCES)
        return None

    def _verified_claims(self, token: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(parts) != 3:
            raise ValueError("The access token is invalid.")
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            signature = _unb64(parts[2])
        except (ValueError, TypeError):
            raise ValueError("The access token is invalid.") from None
        if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "RS256":
            raise ValueError("The access token is invalid.")
        try:
            self.key.public_key().verify(signature, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(),
                                         hashes.SHA256())
        except InvalidSignature:
            raise ValueError("The access token has an invalid signature.") from None
        if claims.get("iss") != self.issuer:
            raise ValueError(f"The access token is from the wrong issuer '{claims.get('iss')}'.")
        return claims
