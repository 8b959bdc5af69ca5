"""Blob Storage for the local cloud: Microsoft's emulator Azurite (npm `azurite`), one per cloud.

Azurite listens on the driver's 127.0.0.1 at a free port with an account of this start's own
(a random key, never the emulator's well-known one), so another local user cannot read it by
knowing the default key. Instances reach it at the same address, as every machine reaches
`https://<account>.blob.core.windows.net` on Azure: in isolated mode the sandbox host binds
that port inside each instance's namespace and forwards it here (SandboxHost's
`loopback_services`); in loopback mode instances share this loopback already. So one
connection string serves the driver, scale-set workers and detached VMs alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from prefect_azmanagers.localcloud._proc import wait_gone
from prefect_azmanagers.localcloud.sandbox.common import tail

ACCOUNT = "azlocal"
CONTAINER = "azmanagers"
AZURITE_ENV = "AZM_AZURITE"  # the azurite-blob executable, when it is not where setup.sh puts it
START_TIMEOUT = 30.0
LEFTOVER_EXIT_TIMEOUT = 10.0  # s for a killed leftover Azurite to exit
INSTALL_HINT = ("install it with `npm install --prefix {prefix} azurite` (scripts/setup.sh does), "
                "or set AZM_AZURITE to an azurite-blob executable")


class AzuriteError(RuntimeError):
    """Azurite is missing or did not start; the message says what to install or where to look."""


@dataclass(frozen=True)
class BlobEndpoint:
    """Where the local cloud's Blob Storage is and how to sign in (the key is a secret)."""

    url: str  # http://127.0.0.1:<port>/<account>, path-style as Azurite serves it
    account: str
    key: str
    container: str = CONTAINER

    @property
    def port(self) -> int:
        return urlsplit(self.url).port

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={self.account};"
                f"AccountKey={self.key};BlobEndpoint={self.url};")


def find_azurite() -> str:
    """The azurite-blob executable; AzuriteError naming the fix when it or Node.js is missing."""
    if shutil.which("node") is None:
        raise AzuriteError(
            "the local cloud's Blob Storage (Azurite) needs Node.js, and `node` is not on PATH: "
            "install Debian's nodejs and npm packages (scripts/setup.sh does), or start the "
            "local cloud with --no-blob")
    candidates = [os.environ.get(AZURITE_ENV), str(_setup_prefix() / "node_modules/.bin/azurite-blob"),
                  shutil.which("azurite-blob")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AzuriteError(f"Azurite (the local cloud's Blob Storage) is not installed: "
                       f"{INSTALL_HINT.format(prefix=_setup_prefix())}; or start with --no-blob")


def _setup_prefix() -> Path:
    return Path(sys.prefix) / "azurite"


class Azurite:
    """An Azurite blob server owned by one local cloud (started and stopped with it)."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir / "azurite"
        self._pid_file = state_dir / "azurite.pid"
        self._proc: asyncio.subprocess.Process | None = None
        self.endpoint: BlobEndpoint | None = None

    async def start(self) -> BlobEndpoint:
        executable = find_azurite()
        self.remove_leftover()
        shutil.rmtree(self.dir, ignore_errors=True)  # a new key each start: old blobs are unreadable
        self.dir.mkdir(mode=0o700, parents=True)
        key = base64.b64encode(secrets.token_bytes(64)).decode()
        port = _free_loopback_port()
        log = (self.dir / "azurite.log").open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                executable, "--blobHost", "127.0.0.1", "--blobPort", str(port),
                "--location", str(self.dir), "--silent", "--skipApiVersionCheck", "--loose",
                "--disableTelemetry",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                env={**os.environ, "AZURITE_ACCOUNTS": f"{ACCOUNT}:{key}"})
        finally:
            log.close()
        self._pid_file.write_text(str(self._proc.pid))
        self.endpoint = BlobEndpoint(f"http://127.0.0.1:{port}/{ACCOUNT}", ACCOUNT, key)
        try:
            await self._wait_listening(port)
            await asyncio.to_thread(_create_container, self.endpoint)
        except BaseException:
            await self.stop()
            raise
        return self.endpoint

    async def _wait_listening(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.returncode is not None:
                raise AzuriteError(f"Azurite exited with {self._proc.returncode} while starting: "
                                      f"{tail(self.dir / 'azurite.log') or '(no output)'}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise AzuriteError(f"Azurite did not listen on 127.0.0.1:{port} within "
                                      f"{START_TIMEOUT:.0f} s: {tail(self.dir / 'azurite.log') or '(no output)'}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """End Azurite (its whole process group); nothing of it keeps listening."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        self._pid_file.unlink(missing_ok=True)
        self.endpoint = None

    def remove_leftover(self) -> None:
        """End the Azurite a crashed run of this state dir left behind, if it still runs."""
        try:
            pid = int(self._pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"azurite" in cmdline and str(self.dir).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            wait_gone(pid, LEFTOVER_EXIT_TIMEOUT)  # still listening until it has exited
        self._pid_file.unlink(missing_ok=True)


def _create_container(endpoint: BlobEndpoint) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(endpoint.connection_string) as service:
        with contextlib.suppress(ResourceExistsError):
            service.create_container(endpoint.container)


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
