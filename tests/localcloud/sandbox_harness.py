"""Helpers for driving a SandboxHost from synchronous tests and reaching its instances with the
stock OpenSSH client (host key pinned from the sandbox's own record)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.httpd import QuietHandler


class LoopThread:
    """An event loop in a thread of its own: the SandboxHost (and its in-process IMDS) keeps
    serving while a test blocks on ssh."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sandbox-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 180) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        """Start `coro` on the loop; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def make_key(directory: Path, name: str) -> Path:
    """A fresh ed25519 key pair; returns the private key file (0600, as ssh-keygen writes it)."""
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


def ssh_argv(ip: str, key: Path, known_hosts: Path, user: str = "azureuser", *options: str) -> list[str]:
    return ["ssh", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", *options, f"{user}@{ip}"]


def pin_host_key(directory: Path, ip: str, host_key: str) -> Path:
    known_hosts = directory / f"known_hosts-{ip}"
    known_hosts.write_text(f"{ip} {host_key}\n")
    return known_hosts


def ssh(ip: str, key: Path, known_hosts: Path, command: str, *options: str, user: str = "azureuser",
        timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `command` on the instance with the stock OpenSSH client."""
    return subprocess.run(ssh_argv(ip, key, known_hosts, user, *options) + [command],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def cmdline(pid: int) -> bytes:
    """A process's NUL-separated argv; empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class LoopbackService:
    """An HTTP server on the driver's 127.0.0.1 standing in for a loopback-only service."""

    def __init__(self) -> None:
        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.reply(b"driver-loopback-ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
