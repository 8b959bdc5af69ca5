"""The lifecycle's pure helpers: the drain deadline from an IMDS NotBefore."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

from prefect_azmanagers.cluster.lifecycle import _seconds_until


def test_seconds_until_not_before():
    soon = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 < _seconds_until(format_datetime(soon, usegmt=True)) <= 30
    assert _seconds_until("") == 0.0 and _seconds_until("garbage") == 0.0


