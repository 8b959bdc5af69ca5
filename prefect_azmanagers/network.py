"""Addresses as the driver sees them: which URLs name this machine's loopback."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(url: str) -> bool:
    """Whether `url`'s host is this machine's loopback (localhost, 127.0.0.0/8, ::1): a URL
    that instances cannot reach unless it is forwarded to them."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
