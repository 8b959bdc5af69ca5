"""Who is using a scale set now: a lease in one tag, renewed by the live cluster that holds it.

A cluster holds the lease of the scale set it provisions into (`azmanagers-lease`:
`<cluster id> <expiry, unix seconds>`), renews it every `RENEW_EVERY` seconds while it runs
and drops it at close. Another cluster naming a scale set whose lease is held and unexpired is
refused (two clusters growing one scale set would claim each other's instances), and `cleanup`
never deletes a scale set with a live lease, whichever host holds it. A crashed holder's lease
expires after `TTL` seconds. The tag is on the resource itself, so this holds on real Azure
across hosts, unlike the creator's pid, which only the creating host can check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

LEASE_TAG = "azmanagers-lease"
TTL = 300.0          # seconds a lease lasts unless renewed
RENEW_EVERY = 60.0   # seconds between renewals


@dataclass(frozen=True)
class Lease:
    holder: str      # cluster id
    expires: float   # unix seconds

    def live(self, now: float | None = None) -> bool:
        return self.expires > (time.time() if now is None else now)

    def describe(self, now: float | None = None) -> str:
        left = self.expires - (time.time() if now is None else now)
        return f"cluster {self.holder} (lease valid for {max(left, 0):.0f} more s)"


def lease_tag(holder: str, *, now: float | None = None) -> dict[str, str]:
    """The tag that grants `holder` the lease for TTL seconds from now."""
    expires = (time.time() if now is None else now) + TTL
    return {LEASE_TAG: f"{holder} {expires:.0f}"}


def read_lease(tags: Mapping[str, str] | None) -> Lease | None:
    """The lease recorded in a resource's tags (None if none, or unreadable)."""
    holder, _, expires = ((tags or {}).get(LEASE_TAG) or "").partition(" ")
    try:
        return Lease(holder, float(expires)) if holder else None
    except ValueError:
        return None
