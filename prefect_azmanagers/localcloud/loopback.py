"""The local cloud's network without root: one loopback address (127.x.y.z) per instance.

Every address of 127.0.0.0/8 is the host's own, so no interface, namespace or route is made:
an instance's sshd and IMDS simply listen on its own address at unprivileged ports (the same
ports for every instance). Instances share the host's network: unlike the isolated mode, they
can reach the driver's 127.0.0.1 and each other's IMDS, and a port an instance listens on
(e.g. an SSH remote forward) must be free on the host. So the Prefect API reaches them, as in
isolated mode, through a forwarder on the block's first address (`gateway`).

Each local cloud takes one /22 of the loopback block (e.g. 127.213.4.0/22), reserved by an
flock(2) on a file named after it in a machine-wide lock directory: local clouds of different
users and state dirs never share addresses, and a crashed one's reservation ends with it.

An instance's processes are recognized by their mount namespace: the sandbox's setup script
mounts a tmpfs whose source is `instance_marker(cloud_id, index)`, so the processes a crashed
local cloud left behind are found again from /proc/PID/mountinfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import os
import signal
from pathlib import Path

from prefect_azmanagers.localcloud._proc import signal_all

SUBNET_PREFIX = 22
_LOCK_DIRS = (Path("/run/lock"), Path("/tmp"))  # world-writable, sticky: shared by every user


def instance_marker(cloud_id: str, index: int) -> str:
    """The source name of the tmpfs that marks instance `index`'s mount namespace."""
    return f"azlc-{cloud_id}-{index}"


class LoopbackNetwork:
    """A reserved /22 of the loopback block; addresses by host number, as netns.VirtualNetwork."""

    def __init__(self, subnet: ipaddress.IPv4Network, lock_fd: int):
        self.subnet = subnet
        self._lock_fd: int | None = lock_fd

    @property
    def gateway(self) -> str:
        """The block's first address: where the Prefect API forwarder listens, as in a VNet."""
        return str(self.subnet.network_address + 1)

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + index)

    @property
    def instance_indexes(self) -> range:
        """Host numbers instances may use (as in a VNet: not the first nor the last)."""
        return range(2, self.subnet.num_addresses - 1)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None


def reserve(block: str | ipaddress.IPv4Network, preferred: ipaddress.IPv4Network | None) -> LoopbackNetwork:
    """Reserve a free /22 of `block` (`preferred` first: this cloud's earlier one)."""
    block = ipaddress.ip_network(block)
    if not block.is_loopback:
        raise ValueError(f"loopback_block {block} is not inside 127.0.0.0/8; use e.g. 127.213.0.0/16")
    prefix = max(SUBNET_PREFIX, block.prefixlen)
    candidates = list(block.subnets(new_prefix=prefix))
    if preferred in candidates:
        candidates.insert(0, preferred)
    lock_dir = next((d for d in _LOCK_DIRS if os.access(d, os.W_OK | os.X_OK)), None)
    if lock_dir is None:
        raise OSError(f"none of {', '.join(map(str, _LOCK_DIRS))} is writable: nowhere to reserve "
                      "loopback addresses")
    for subnet in candidates:
        fd = _open_lock(lock_dir / f"azmanagers-localcloud-{subnet.network_address}-{subnet.prefixlen}.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another local cloud holds it
            os.close(fd)
            continue
        return LoopbackNetwork(subnet, fd)
    raise RuntimeError(f"no free /{prefix} left in the loopback block {block}: every one is held by "
                       "another local cloud; stop one or set another loopback_block in config.json")


def _open_lock(path: Path) -> int:
    """Open (creating it world-readable if missing) a lock file that may belong to another user:
    flock needs only a read-only descriptor."""
    while True:
        with contextlib.suppress(FileNotFoundError):
            return os.open(path, os.O_RDONLY)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue  # created meanwhile by someone else: open theirs
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o644)  # whatever our umask: others must be able to open it
        return fd


def marked_pids(prefix: str) -> list[int]:
    """Processes we may inspect whose mount namespace holds a mount whose source starts with
    `prefix` (see instance_marker). One mountinfo read per distinct namespace."""
    by_ns: dict[tuple[int, int], list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/mnt")
        except OSError:
            continue
        by_ns.setdefault((st.st_dev, st.st_ino), []).append(int(entry.name))
    found = []
    for pids in by_ns.values():
        for pid in pids:  # any live member's mountinfo describes the namespace
            try:
                mountinfo = Path(f"/proc/{pid}/mountinfo").read_text()
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ESRCH, errno.EINVAL):
                    continue  # this one just ended: ask another member
                break  # not ours to read
            if any(_mount_source(line).startswith(prefix) for line in mountinfo.splitlines()):
                found += pids
            break
    return sorted(found)


def _mount_source(mountinfo_line: str) -> str:
    # "... - fstype source options": the source follows the separator and the type
    _, _, after = mountinfo_line.partition(" - ")
    fields = after.split(" ")
    return fields[1] if len(fields) > 1 else ""


async def kill_leftovers(cloud_id: str) -> list[int]:
    """SIGKILL every process of a loopback instance of `cloud_id` (an earlier, crashed run),
    until none is left (they may fork meanwhile); returns their pids."""
    killed: set[int] = set()
    for _ in range(50):
        pids = [p for p in marked_pids(f"azlc-{cloud_id}-") if p != os.getpid()]
        if not pids:
            break
        signal_all(pids, signal.SIGKILL)
        killed.update(pids)
        await asyncio.sleep(0.02)
    return sorted(killed)
