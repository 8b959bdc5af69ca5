"""Host keys pinned per instance vmId (not per IP: private IPs are reused across scale sets).

The file uses OpenSSH's known_hosts line syntax with the vmId in the host field
(`<vmId> <key type> <base64> [comment]`), so it stays readable with standard tools. The first
contact with an instance records its key (trust on first use, as the original's workers did
implicitly); every later connection must present the same key, or HostKeyMismatch is raised and
the connection refused. Several processes may share the file: every change is made under a
lock (`<file>.lock`, flock) and written whole to `<file>.tmp`, then renamed over the file, so a
reader, a concurrent writer or a crash mid-write never sees a truncated file.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncssh

from prefect_azmanagers.exceptions import HostKeyMismatch


class PinnedHostKeys:
    """The pinned host keys of a known-hosts file, keyed by vmId."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()

    def _text(self) -> str:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return ""

    def _read(self) -> dict[str, str]:
        keys: dict[str, str] = {}
        for line in self._text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and not line.startswith("#"):
                keys.setdefault(fields[0], f"{fields[1]} {fields[2]}")
        return keys

    def get(self, vm_id: str) -> asyncssh.SSHKey | None:
        """The key pinned for `vm_id`, or None before first contact."""
        line = self._read().get(vm_id)
        return asyncssh.import_public_key(line) if line else None

    def check(self, vm_id: str, key: asyncssh.SSHKey, address: str) -> bool:
        """True if `key` is pinned for `vm_id`; False if nothing is pinned yet.

        Raises HostKeyMismatch when a different key is pinned.
        """
        pinned = self.get(vm_id)
        if pinned is None:
            return False
        if pinned.public_data != key.public_data:
            raise HostKeyMismatch(
                f"instance {vm_id} at {address} presented a {key.get_algorithm()} host key "
                f"({key.get_fingerprint()}) but {pinned.get_algorithm()} key "
                f"{pinned.get_fingerprint()} is pinned for it in {self.path}. The connection was "
                "refused: someone may be intercepting it. If the instance was legitimately "
                f"re-imaged, delete the line starting with {vm_id} from that file."
            )
        return True

    def pin(self, vm_id: str, key: asyncssh.SSHKey, address: str) -> None:
        """Record `key` for `vm_id` unless a key is already pinned (then `check` it)."""
        with self._locked():
            if not self.check(vm_id, key, address):
                line = key.export_public_key("openssh").decode().split()
                text = self._text()
                if text and not text.endswith("\n"):
                    text += "\n"
                self._replace(f"{text}{vm_id} {line[0]} {line[1]} {address}\n")

    def forget(self, vm_ids: set[str]) -> None:
        """Remove the pins of deleted instances, so the file does not grow without bound."""
        with self._locked():
            lines = self._text().splitlines(keepends=True)
            kept = [line for line in lines if not line.split() or line.split()[0] not in vm_ids]
            if len(kept) != len(lines):
                self._replace("".join(kept))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive among this process's threads and, through flock on `<file>.lock`, other
        processes (the file itself is replaced by rename, so it cannot carry the lock)."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path.with_name(self.path.name + ".lock"),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _replace(self, text: str) -> None:
        """Write `text` to `<file>.tmp` (0600, synced) and rename it over the file."""
        temporary = self.path.with_name(self.path.name + ".tmp")  # ours alone, under the lock
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a leftover of a crash keeps its mode otherwise
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, self.path)
