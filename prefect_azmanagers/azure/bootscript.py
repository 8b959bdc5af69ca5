"""The boot script (customData) every instance runs once, as root, at first boot.

It prepares the instance and leaves a marker the driver checks over SSH:

1. exports the caller's environment variables, each value shell-quoted (`shlex.quote`), so a
   value with quotes, `$`, backticks or newlines arrives unchanged; the same assignments are
   written to `~/.azmanagers/env.sh` (0600: the values may be secrets) so processes started
   later over SSH can source them;
2. runs the template's temp-disk commands (a failing one is logged, not fatal, as in AzManagers);
3. runs the hooks in order (trusted bash fragments: customenv, a worker start, ...);
4. its EXIT trap writes `/home/<admin>/.azmanagers/boot.status`: `ready`, or
   `failed: exit <code> at line <n> (<step>)` (docs/architecture.md, "Inside an instance").

It holds no secret: no cookie, no credential, no API key (Azure keeps customData readable to
anyone who can read the VM model). Its size is checked against Azure's limit: customData is
base64 whose DECODED form may be at most 65535 bytes (OSProfile.customData, Compute REST API).
The original checked 64000 base64 characters; we check the documented limit on the script.

`boot_log_tail` fetches the end of the instance's cloud-init output and its boot.status over
SSH, for error messages about instances that failed or never became ready (only from an
instance whose pinned host key it is given); `wait_until_booted` waits for the marker and
raises BootFailed with that tail.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from prefect_azmanagers.exceptions import BootFailed, ConfigurationError, CustomDataTooLarge

READY_STATUS_PATH = "/home/{admin}/.azmanagers/boot.status"
CLOUD_INIT_LOG = "/var/log/cloud-init-output.log"
CUSTOM_DATA_LIMIT = 65535  # bytes of the decoded customData (Azure's documented maximum)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]*\Z", re.I)


def _env_lines(env: Mapping[str, str]) -> list[str]:
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ConfigurationError(
                f"Environment variable name {name!r} is not a valid shell name "
                "(letters, digits and '_', not starting with a digit).")
        lines.append(f"export {name}={shlex.quote(str(value))}")
    return lines


def boot_script(*, admin_username: str, tempdisk: str = "", env: Mapping[str, str] | None = None,
                hooks: Sequence[str] = ()) -> str:
    """The bash boot script for an instance whose admin user is `admin_username`.

    `tempdisk` and `hooks` are trusted bash fragments (from the template and from this package);
    `env` values are data and are quoted. A failing command in a hook (or in the env step)
    stops the script and the status file says which step and line failed.
    """
    if not _USER_NAME.match(admin_username or ""):
        raise ConfigurationError(
            f"Admin user name {admin_username!r} is not a valid Linux user name: use letters, digits, "
            "'_', '.' and '-', starting with a letter or '_' (the manifest's ssh_user).")
    admin = admin_username
    home = f"/home/{admin}"
    exports = _env_lines(env or {})
    env_file = "\n".join(["# written by the prefect-azmanagers boot script", *exports, ""])
    parts = [
        "#!/bin/bash",
        "# prefect-azmanagers boot script: runs once as root at first boot (cloud-init user data).",
        f"azm_status_dir={shlex.quote(home + '/.azmanagers')}",
        'azm_status="$azm_status_dir/boot.status"',
        "azm_step=prepare",
        "azm_line=0",
        "azm_finish() {",
        "  local rc=$?",
        '  mkdir -p "$azm_status_dir"',
        '  if [ "$rc" -eq 0 ]; then azm_s=ready; else azm_s="failed: exit $rc at line $azm_line ($azm_step)"; fi',
        '  printf \'%s\\n\' "$azm_s" > "$azm_status.tmp" && mv -f "$azm_status.tmp" "$azm_status"',
        f'  chown -R {shlex.quote(admin)}: "$azm_status_dir" 2>/dev/null || true',
        '  echo "prefect-azmanagers boot: $azm_s"',
        "}",
        "trap azm_finish EXIT",
        "trap 'azm_line=$LINENO' ERR",
        "set -eE",
        'mkdir -p "$azm_status_dir"',
        'rm -f "$azm_status"',
        "azm_step=env",
        *exports,
        'rm -f "$azm_status_dir/env.sh"',  # created anew under umask 077: 0600 from the start
        f"(umask 077 && cat > \"$azm_status_dir/env.sh\" <<'AZM_ENV_EOF'\n{env_file}AZM_ENV_EOF\n)",
        f'chown -R {shlex.quote(admin)}: "$azm_status_dir" 2>/dev/null || true',
    ]
    if tempdisk.strip():
        # As in AzManagers, a failing temp-disk command (e.g. `mkdir` of a directory the image
        # already has) is logged but does not fail the boot; errexit is for our own steps.
        parts += ["azm_step=tempdisk", "set +e", tempdisk.rstrip("\n"), "set -e"]
    for i, hook in enumerate(hooks, 1):
        parts += [f"azm_step='hook {i}'", hook.rstrip("\n")]
    parts += ["azm_step=done", ""]
    script = "\n".join(parts)
    if "\nAZM_ENV_EOF\n" in env_file:  # a value that is exactly the heredoc terminator line
        raise ConfigurationError("An environment value contains the line 'AZM_ENV_EOF'; rename it.")
    return script


def encode_custom_data(script: str) -> str:
    """customData for ARM (base64 of the script); CustomDataTooLarge if over Azure's limit."""
    raw = script.encode()
    if len(raw) > CUSTOM_DATA_LIMIT:
        raise CustomDataTooLarge(
            f"The boot script is {len(raw)} bytes ({len(base64.b64encode(raw))} as base64); Azure "
            f"accepts at most {CUSTOM_DATA_LIMIT} bytes of customData. Ship less through it: fewer "
            "or smaller environment variables, or a customenv that installs packages by name "
            "instead of embedding files.")
    return base64.b64encode(raw).decode()


async def _run(conn: Any, command: str) -> str:
    result = await conn.run(command, check=False)
    return (result.stdout or "") + (result.stderr or "")


async def read_boot_status(conn: Any, admin_username: str) -> str | None:
    """The instance's boot.status over an open asyncssh connection: "ready", "failed: ...",
    or None while the boot script is still running."""
    path = shlex.quote(READY_STATUS_PATH.format(admin=admin_username))
    result = await conn.run(f"cat {path} 2>/dev/null", check=False)
    return (result.stdout or "").strip() or None


async def wait_until_booted(conn: Any, *, admin_username: str, name: str, timeout: float,
                            poll: float = 1.0) -> None:
    """Wait for the boot script to write "ready"; BootFailed with the log tail if it failed
    or did not finish within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = await read_boot_status(conn, admin_username)
        if status == "ready":
            return
        if status is not None or time.monotonic() >= deadline:
            what = f"its boot script {status}" if status else f"it did not finish booting within {timeout:.0f} s"
            tail = await boot_log_tail(conn, admin_username=admin_username)
            raise BootFailed(f"Instance {name}: {what}.\n{tail}")
        await asyncio.sleep(poll)


async def boot_log_tail(target: Any, *, admin_username: str, manifest: Any = None,
                        lines: int = 50, host_key: Any = None,
                        connect_timeout: float = 15.0) -> str:
    """The last `lines` lines of the instance's cloud-init output and its boot.status.

    `target` is an open asyncssh connection (the cluster's own, host key already pinned), or an
    address: then a connection is opened with the manifest's user, port and private key, only
    if `host_key` (the key pinned for the instance: an asyncssh key or an OpenSSH public key
    line) is given, and the server must present that key. ~/.ssh/config and the user's SSH
    agent are ignored. (To read an instance never contacted, pinning its key on first contact,
    use `cluster.transport.read_boot_log`.) Never raises for an unreachable instance: the text
    says why nothing could be read.
    """
    status_path = READY_STATUS_PATH.format(admin=admin_username)
    command = (
        f"echo '== {CLOUD_INIT_LOG} (last {int(lines)} lines) =='; "
        f"tail -n {int(lines)} {CLOUD_INIT_LOG} 2>/dev/null || "
        f"sudo -n tail -n {int(lines)} {CLOUD_INIT_LOG} 2>&1; "
        f"echo '== boot.status =='; cat {shlex.quote(status_path)} 2>/dev/null || echo '(none yet)'"
    )
    if not isinstance(target, str):
        return await _run(target, command)
    import asyncssh

    if manifest is None:
        raise ConfigurationError(
            "boot_log_tail got an address but no manifest to open an SSH connection with: pass "
            "manifest=, or an open connection instead of the address.")
    if host_key is None:
        return (f"(the boot log of {target} was not read: no host key is pinned for that "
                "instance, and a diagnostic read never trusts an unknown one)")
    key = asyncssh.import_public_key(host_key) if isinstance(host_key, (str, bytes)) else host_key
    try:
        async with asyncssh.connect(
            target, port=manifest.ssh_port, username=manifest.ssh_user,
            client_keys=[asyncssh.import_private_key(manifest.read_private_key())],
            known_hosts=([key], [], []),
            server_host_key_algs=[alg.decode() for alg in key.sig_algorithms],
            config=None, agent_path=None, x509_trusted_certs=None, preferred_auth="publickey",
            connect_timeout=connect_timeout,
        ) as conn:
            return await _run(conn, command)
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
        return f"(could not read the boot log from {target} over SSH: {type(exc).__name__}: {exc})"
