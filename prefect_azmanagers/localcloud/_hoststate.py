"""Machine-wide state shared by every local cloud on this host (several may run at once, e.g.
parallel test sessions): a lock serializing changes to host resources they share (address
sub-blocks, local accounts) and the directory where that shared bookkeeping lives."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path

HOST_STATE_DIR = Path(os.environ.get("AZMANAGERS_LOCALCLOUD_HOST_STATE", "/var/lib/azmanagers-localcloud"))


@contextlib.asynccontextmanager
async def host_lock() -> AsyncIterator[None]:
    """Exclusive, machine-wide; waits in a thread so the event loop keeps running."""
    HOST_STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(HOST_STATE_DIR / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    acquiring = asyncio.ensure_future(asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX))
    try:
        # if we are cancelled while waiting, the thread still holds fd: let it finish before
        # the fd is closed (and its number possibly reused)
        await asyncio.shield(acquiring)
        yield
    finally:
        with contextlib.suppress(BaseException):
            await acquiring
        os.close(fd)  # closing releases the lock
