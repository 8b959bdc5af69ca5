"""An instance's OpenSSH server: its config, host key and authorized keys, at the paths a VM
has them (/etc/ssh is the sandbox's ssh/ directory inside the instance, see fsview)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from prefect_azmanagers.localcloud._proc import run

SSHD = "/usr/sbin/sshd"
_SFTP_SERVER = "/usr/lib/openssh/sftp-server"


IMDS_URL_VARIABLE = "AZMANAGERS_IMDS_URL"  # set in every SSH session: where this instance's IMDS is


def config(listen_ip: str, port: int, admin: str, env: dict[str, str]) -> str:
    """sshd_config: OpenSSH's defaults (AcceptEnv only LANG LC_*, remote forwarding on,
    GatewayPorts off, MaxSessions 10) plus key-only login for the admin user, and the
    instance's environment (its IMDS URL) in every session."""
    lines = [
        "# written by the local cloud; paths are as seen inside the instance",
        f"ListenAddress {listen_ip}:{port}",
        "HostKey /etc/ssh/ssh_host_ed25519_key",
        "PidFile /run/sshd.pid",
        "AuthorizedKeysFile .ssh/authorized_keys",
        f"AllowUsers {admin}",
        "PermitRootLogin no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "AcceptEnv LANG LC_*",
        "AllowTcpForwarding yes",
        "GatewayPorts no",
        "X11Forwarding no",
        "PrintMotd no",
        "SetEnv " + " ".join(f"{name}={value}" for name, value in env.items()),
    ]
    if Path(_SFTP_SERVER).exists():
        lines.append(f"Subsystem sftp {_SFTP_SERVER}")
    return "\n".join(lines) + "\n"


async def prepare(ssh_dir: Path, home: Path, listen_ip: str, port: int, admin: str, uid: int, gid: int,
                  public_keys: list[str], comment: str, env: dict[str, str]) -> str:
    """Write /etc/ssh (config, a fresh ed25519 host key, the client config) and the admin's
    ~/.ssh/authorized_keys with exactly `public_keys`. Returns the host public key line."""
    keys = [k.strip() for k in public_keys]
    if not keys or any(not k or "\n" in k or "\r" in k for k in keys):
        raise ValueError("osProfile.linuxConfiguration.ssh.publicKeys must hold at least one key, "
                         "each one OpenSSH public key line (e.g. 'ssh-ed25519 AAAA... comment')")
    ssh_dir.mkdir(mode=0o755, exist_ok=True)
    (ssh_dir / "sshd_config").write_text(config(listen_ip, port, admin, env))
    if Path("/etc/ssh/ssh_config").exists():
        shutil.copyfile("/etc/ssh/ssh_config", ssh_dir / "ssh_config")
    key = ssh_dir / "ssh_host_ed25519_key"
    if not key.exists():
        await run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key))
    dot_ssh = home / ".ssh"
    dot_ssh.mkdir(mode=0o700, exist_ok=True)
    authorized = dot_ssh / "authorized_keys"
    authorized.write_text("".join(k + "\n" for k in keys))
    authorized.chmod(0o600)
    for path in (dot_ssh, authorized):
        os.chown(path, uid, gid)
    return key.with_suffix(".pub").read_text().strip()
