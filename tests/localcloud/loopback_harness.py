"""Running the local cloud as a real non-root user, for the loopback-mode tests.

As root, `NonRootUser.create()` adds a throwaway local account (removed by `remove()`, which
fails if any process of it is left) and runs commands as it with setpriv: uid, gid and groups
of that account, no capability. The only help it gets: the project's interpreter, its venv and
the checkout of an editable install may live under directories other users cannot enter (here
/root/.pyenv, /root being 0700; a checkout in a 0700 `mktemp -d`), so each command runs in a
private mount namespace where each such directory is an empty tmpfs with exactly the
interpreter's trees bound back (what an administrator's world-readable install gives a user).
`as_user` runs any uid that way (the `nobody` of the credential tests). Not root: the current
user runs the commands as they are.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect_azmanagers.localcloud.fsview import PythonTrees

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _interpreter_trees() -> list[Path]:
    """What another user needs to run `sys.executable` with this package importable: the
    trees an instance gets too (the venv unresolved, the base interpreter, an editable
    install's package directory)."""
    return list(PythonTrees.of_this_interpreter().expose)


def _closed_ancestor(path: Path) -> Path | None:
    """The outermost ancestor of `path` that others may not enter (no o+x), if any."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def _view_script(stage: Path) -> str:
    """Shell lines (run as root in a fresh mount namespace) that make the interpreter reachable:
    its trees under a closed directory are bound onto `stage`, an empty tmpfs covers each such
    directory, and the trees are moved back to their own paths."""
    q = shlex.quote
    closed_by = {t: c for t in _interpreter_trees() if (c := _closed_ancestor(t)) is not None}
    trees, closed = list(closed_by), sorted(set(closed_by.values()))
    lines = ["set -e"]
    for i, tree in enumerate(trees):
        lines.append(f"mkdir -p {q(str(stage / str(i)))} && mount --bind {q(str(tree))} {q(str(stage / str(i)))}")
    for path in closed:
        lines.append(f"mount -t tmpfs -o mode=755,size=64k azlc-test-view {q(str(path))}")
    for i, tree in enumerate(trees):
        lines.append(f"mkdir -p {q(str(tree))} && mount --move {q(str(stage / str(i)))} {q(str(tree))}")
    return "\n".join(lines)


def _in_view(view: str, uid: int, gid: int, command: list[str], *, groups: str) -> list[str]:
    """argv running `command` as uid/gid (no capability) in a private mount namespace set up by
    `view`; `groups` is setpriv's --init-groups (an account's groups) or --clear-groups."""
    script = view + f'\nuid=$0 gid=$1; shift\nexec setpriv --reuid="$uid" --regid="$gid" {groups} -- "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script,
            str(uid), str(gid), *command]


@contextmanager
def as_user(uid: int, gid: int) -> Iterator[Callable[[list[str]], list[str]]]:
    """As root: for the block, a function making the argv that runs a command as uid/gid, with
    no groups or capability, where this interpreter is reachable wherever it is installed."""
    stage = Path(tempfile.mkdtemp(prefix="azlc-view-"))   # root's, 0700: only mounts use it
    try:
        view = _view_script(stage)
        yield lambda command: _in_view(view, uid, gid, command, groups="--clear-groups")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@dataclass
class NonRootUser:
    name: str
    uid: int
    gid: int
    base: Path  # the user's own directory (home and state dirs), removed with the user
    created: bool  # a throwaway account made by create()
    _view: str = field(default="", repr=False)
    _stage: Path | None = field(default=None, repr=False)

    @classmethod
    def create(cls) -> NonRootUser:
        """A throwaway account when root, else the current user."""
        base = Path(tempfile.mkdtemp(prefix="azlc-user-"))
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid())
            return cls(me.pw_name, me.pw_uid, me.pw_gid, base, created=False)
        name = f"azlct{uuid.uuid4().hex[:6]}"
        home = base / "home"
        subprocess.run(["useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/bash",
                        "--user-group", name], check=True, capture_output=True)
        account = pwd.getpwnam(name)
        home.mkdir()
        for path in (base, home):
            os.chown(path, account.pw_uid, account.pw_gid)
        user = cls(name, account.pw_uid, account.pw_gid, base, created=True)
        user._stage = Path(tempfile.mkdtemp(prefix="azlc-view-"))  # root's, 0700: only mounts use it
        user._view = _view_script(user._stage)
        return user

    def env(self) -> dict[str, str]:
        home = str(self.base / "home") if self.created else os.environ.get("HOME", str(self.base))
        return {"HOME": home, "PATH": PATH, "LANG": "C.UTF-8", "USER": self.name, "LOGNAME": self.name,
                "PYTHONDONTWRITEBYTECODE": "1"}

    def argv(self, command: list[str], env_extra: dict[str, str] | None = None) -> list[str]:
        """`command` as this user (a clean environment, cwd its base directory)."""
        env = ["env", "-i", *(f"{k}={v}" for k, v in {**self.env(), **(env_extra or {})}.items())]
        if not self.created:
            return [*env, *command]
        return _in_view(self._view, self.uid, self.gid, [*env, *command], groups="--init-groups")

    def run(self, command: list[str], timeout: float = 180,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(command, env_extra), capture_output=True, text=True, timeout=timeout,
                              cwd=self.base, stdin=subprocess.DEVNULL)

    def python(self, code: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code], timeout=timeout)

    def start_cloud(self, state_dir: Path, **kwargs: Any) -> dict[str, Any]:
        """Start a local cloud (library API, background) as this user; its localcloud.json."""
        state_dir.mkdir(parents=True, exist_ok=True)
        if self.created:
            os.chown(state_dir, self.uid, self.gid)
        result = self.python("import json, sys; from prefect_azmanagers.localcloud import start; "
                             f"print(json.dumps(start({str(state_dir)!r}, **{kwargs!r})))")
        if result.returncode != 0:
            raise RuntimeError(f"start as {self.name} failed:\n{result.stdout}\n{result.stderr}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def stop_cloud(self, state_dir: Path) -> subprocess.CompletedProcess:
        return self.python(f"from prefect_azmanagers.localcloud import stop; print(stop({str(state_dir)!r}))")

    def pids(self) -> list[int]:
        """Live processes of this user (zombies excluded)."""
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry.name}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if int(fields["Uid"].split()[0]) == self.uid and not fields["State"].startswith("Z"):
                found.append(int(entry.name))
        return found

    def remove(self) -> None:
        """Remove the account and its directory; AssertionError if a process of it is left
        (after killing them, so the machine is clean either way)."""
        left = self.pids() if self.created else []
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.created:
            time.sleep(0.2)
            subprocess.run(["userdel", self.name], check=False, capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
        assert not left, f"processes of {self.name} left behind: {left}"


def listeners_in(network: str) -> list[str]:
    """host:port of every TCP socket listening on an address of `network` (from /proc/net/tcp)."""
    import ipaddress

    net = ipaddress.ip_network(network)
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state != "0A":  # LISTEN
            continue
        hex_ip, hex_port = local.split(":")
        ip = ipaddress.ip_address(bytes.fromhex(hex_ip)[::-1])
        if ip in net:
            found.append(f"{ip}:{int(hex_port, 16)}")
    return found
