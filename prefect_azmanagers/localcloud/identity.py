"""Who may call the local cloud: its credential and how requests are checked against it.

Each start makes a fresh random bearer token (`Identity.create()`), kept in localcloud.json
(0600, in the 0700 state dir) and in the saved `localcloud` manifest (a SecretStr, credential
"static"). The ARM endpoint and the admin API compare it in constant time; ARM answers any other
token with its own 401 (exceptions.py: `authentication_missing` / `invalid_token`), so another
user of the machine cannot create VMs whose customData runs as root.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass

from prefect_azmanagers.localcloud import exceptions as errors


@dataclass
class Identity:
    """The local cloud's credentials (one set per start)."""

    tenant_id: str
    static_token: str
    issuer_base: str = ""  # https://127.0.0.1:PORT, set once the endpoint listens

    @classmethod
    def create(cls) -> Identity:
        return cls(tenant_id=str(uuid.uuid4()), static_token=secrets.token_urlsafe(32))

    @property
    def authority(self) -> str:
        """What ARM's 401 challenge names as the authorization_uri."""
        return f"{self.issuer_base}/{self.tenant_id}"

    def info(self) -> dict[str, str]:
        """The fields localcloud.json (and the manifest) carry."""
        return {"static_token": self.static_token, "tenant_id": self.tenant_id}

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
        return errors.invalid_token(self.authority)
