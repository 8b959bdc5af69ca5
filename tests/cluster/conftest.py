"""Fixtures of the engine tests: a throwaway OpenSSH server on 127.0.0.1 for transport and
agent tests that do not need the local cloud.

The server is configured like a local-cloud instance's (own host key, PidFile,
AuthorizedKeysFile holding exactly one test key, StrictModes no, UsePAM no) and accepts that
key for root: the project's interpreter lives under /root (mode 700), which another local
account cannot execute without the local cloud's mount namespace.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

SSHD = "/usr/sbin/sshd"


@dataclass
class Sshd:
    address: str
    port: int
    username: str
    client_key: asyncssh.SSHKey
    host_key_file: Path
    python: str
    proc: subprocess.Popen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sshd did not listen: {log.read_text()}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if shutil.which(SSHD) is None:
        pytest.fail("OpenSSH server (/usr/sbin/sshd) is required: apt-get install openssh-server")
    root = tmp_path_factory.mktemp("sshd")
    host_key = root / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    (root / "authorized_keys").write_bytes(client_key.export_public_key())
    port = _free_port()
    log = root / "sshd.log"
    (root / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\nHostKey {host_key}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "AllowTcpForwarding yes\nGatewayPorts no\nMaxSessions 64\nMaxStartups 64\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, proc, log)
        yield Sshd("127.0.0.1", port, "root", client_key, host_key, sys.executable, proc)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def anyio_backend():
    return "asyncio"
