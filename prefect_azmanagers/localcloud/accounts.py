"""Local accounts for instances' adminUsername (OpenSSH only logs in local accounts).

Isolated mode (root):
A missing account is created (no password, bash) and removed again when the last local cloud
using it stops. Several local clouds may share one account (parallel test sessions all use
"azureuser"), so usage is recorded machine-wide: HOST_STATE_DIR/users/<name>/ holds `created`
when a local cloud created the account, and one file per local cloud using it.

Loopback mode (no root): no account is created; each instance sees its own /etc/passwd in
which adminUsername is the local cloud's own user (`loopback_identity`), so its sshd, running
as that user, logs in adminUsername.
"""

from __future__ import annotations

import logging
import pwd
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from prefect_azmanagers.localcloud._hoststate import HOST_STATE_DIR, host_lock
from prefect_azmanagers.localcloud._proc import CommandError, run

logger = logging.getLogger(__name__)

_USERS_DIR = HOST_STATE_DIR / "users"
_VALID_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_FIRST_REGULAR_UID = 1000


class AccountError(ValueError):
    """The adminUsername cannot be used as a local account."""


def check_name(name: str) -> None:
    """AccountError unless `name` is a valid Linux user name."""
    if not _VALID_NAME.match(name):
        raise AccountError(
            f"adminUsername {name!r} is not a valid Linux user name: use lowercase letters, "
            "digits, '_' or '-', starting with a letter or '_', at most 32 characters"
        )


def loopback_identity(name: str, uid: int, gid: int) -> tuple[str, str]:
    """/etc/passwd and /etc/group of a loopback-mode instance, where no account is created: the
    host's files with `name` (home /home/<name>, bash) as the only entry of `uid` and `gid`,
    the ids the local cloud's own user has inside the instance's user namespace."""
    check_name(name)

    def others(path: str, id_field: int, own_id: int) -> list[str]:
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        keep = []
        for line in lines:
            fields = line.split(":")
            if len(fields) > id_field and (fields[0] == name or fields[id_field] == str(own_id)):
                continue
            keep.append(line)
        return keep

    passwd = [f"{name}:x:{uid}:{gid}::/home/{name}:/bin/bash", *others("/etc/passwd", 2, uid)]
    group = [f"{name}:x:{gid}:", *others("/etc/group", 2, gid)]
    return "\n".join(passwd) + "\n", "\n".join(group) + "\n"


async def acquire(name: str, cloud_id: str) -> pwd.struct_passwd:
    """The account `name` (created if missing), recorded as used by `cloud_id`."""
    check_name(name)
    async with host_lock():
        usage = _USERS_DIR / name
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            await run("useradd", "--no-create-home", "--home-dir", f"/home/{name}",
                      "--shell", "/bin/bash", "--password", "*", "--user-group", name)
            account = pwd.getpwnam(name)
            usage.mkdir(parents=True, exist_ok=True)
            (usage / "created").touch()
        if account.pw_uid < _FIRST_REGULAR_UID:
            raise AccountError(
                f"adminUsername {name!r} is a system account on this machine (uid "
                f"{account.pw_uid}); choose another adminUsername in the template's osProfile"
            )
        if _is_locked(name):
            raise AccountError(
                f"the local account {name!r} exists and is locked ('!' in /etc/shadow): sshd "
                f"without PAM refuses every login to it, keys included; unlock it with "
                f"`usermod -p '*' {name}` or choose another adminUsername"
            )
        usage.mkdir(parents=True, exist_ok=True)
        (usage / f"cloud-{cloud_id}").touch()
        return account


async def release_all(cloud_id: str, is_running: Callable[[str], bool]) -> list[str]:
    """Drop `cloud_id`'s use of every account, and the use recorded by local clouds that are no
    longer running (`is_running(other_id)`: crashed without stop); delete the accounts a local
    cloud created and no running one uses. Returns the deleted names."""
    deleted = []
    if not _USERS_DIR.is_dir():
        return deleted
    async with host_lock():
        for usage in sorted(_USERS_DIR.iterdir()):
            for marker in usage.glob("cloud-*"):
                other = marker.name.removeprefix("cloud-")
                if other == cloud_id or not is_running(other):
                    marker.unlink(missing_ok=True)
            if any(usage.glob("cloud-*")):
                continue
            if (usage / "created").exists():
                try:
                    await run("userdel", usage.name)
                except CommandError as exc:  # e.g. still logged in: keep the record, retry later
                    logger.warning("cannot remove account %s yet: %s", usage.name, exc)
                    continue
                deleted.append(usage.name)
            shutil.rmtree(usage, ignore_errors=True)
    return deleted


def _is_locked(name: str) -> bool:
    try:
        lines = Path("/etc/shadow").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(":")
        if fields[0] == name and len(fields) > 1:
            return fields[1].startswith("!")
    return False
