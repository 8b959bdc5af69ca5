"""An instance's private view of the filesystem, so paths match a real VM.

The instance's sshd starts in a mount namespace of its own, prepared by a shell script that:
- binds the sandbox directory's parts onto /home/<admin> (only that home under /home), /tmp,
  /mnt, /var/log, /etc/ssh (its sshd config and host key), /run and /etc/hosts (its hostname
  resolves to its private IP, as Azure's DNS does), and gives it its own /dev/shm;
- hides the host's /root (and the source tree of an editable install of this package: the
  driver's repository must not be importable on an instance) behind empty tmpfs mounts, then
  binds back, read-only, exactly the Python trees an instance needs to run the local cloud's
  interpreter (`sys.executable`, same path) with `prefect_azmanagers` importable.
Everything else (/usr, /etc, ...) is the host's, as the image of a VM would be. In loopback mode
(no root; a user namespace) /etc/passwd and /etc/group are the sandbox's too, naming the local
cloud's own user adminUsername, and /usr/sbin/runuser is `runuser_shim`.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

# Directories an instance keeps from the host: never hidden behind a tmpfs.
_SYSTEM_DIRS = [Path(p) for p in ("/usr", "/etc", "/var", "/bin", "/sbin", "/lib", "/lib64",
                                  "/dev", "/proc", "/sys", "/run", "/opt")]

# sandbox subdirectory -> path inside the instance (the sandbox dir is the instance's disk)
SANDBOX_BINDS = {"tmp": "/tmp", "log": "/var/log", "ssh": "/etc/ssh", "run": "/run",
                 "hosts": "/etc/hosts"}


@dataclass(frozen=True)
class PythonTrees:
    """What an instance needs of the local cloud's Python, and what it must not see."""

    expose: tuple[Path, ...]  # bound read-only at the same path
    hide: tuple[Path, ...]  # covered by an empty tmpfs first

    @classmethod
    def of_this_interpreter(cls) -> PythonTrees:
        prefixes = {Path(sys.prefix), Path(sys.base_prefix).resolve(),
                    Path(sys.executable).resolve().parent.parent}
        package = Path(__file__).resolve().parents[1]  # prefect_azmanagers/
        expose = set(prefixes)
        hide = {Path("/root")}
        if not any(package.is_relative_to(p) for p in prefixes):  # an editable install
            expose.add(package)
            source_root = package.parent
            if not any(s.is_relative_to(source_root) for s in _SYSTEM_DIRS):
                hide.add(source_root)
        # keep only outermost paths of each set
        return cls(expose=_outermost(expose), hide=_outermost(hide))


def _outermost(paths: set[Path]) -> tuple[Path, ...]:
    return tuple(sorted(p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)))


def setup_script(sandbox: Path, admin: str, hostname: str, trees: PythonTrees, then: list[str], *,
                 marker: str, extra_binds: dict[str, str] | None = None) -> str:
    """The shell script run in the new mount and UTS namespaces; it ends by exec'ing `then`.

    `marker` names the scratch tmpfs (the namespace's processes are found by it after a crash);
    `extra_binds` maps more sandbox files to paths inside (e.g. /etc/passwd in loopback mode)."""
    q = shlex.quote
    lines = [
        "set -e",
        f"hostname {q(hostname)}",
        # a scratch tmpfs on /mnt holds the sandbox and the Python trees while /root etc. are
        # covered (the sandbox itself may live under /root or /tmp)
        f"mount -t tmpfs -o mode=700,size=64k {q(marker)} /mnt",
        f"mkdir /mnt/sandbox && mount --bind {q(str(sandbox))} /mnt/sandbox",
    ]
    # trees under a hidden path, or under a path the instance gets privately (/tmp, /home, ...:
    # a checkout in /tmp is common), are staged on /mnt and moved back once those are in place
    private = [Path(p) for p in (*SANDBOX_BINDS.values(), "/home", "/mnt", "/dev/shm")]
    staged = [t for t in trees.expose
              if any(t.is_relative_to(h) for h in (*trees.hide, *private))]
    for i, tree in enumerate(staged):
        lines.append(f"mkdir /mnt/t{i} && mount --bind {q(str(tree))} /mnt/t{i}")
    for path in trees.hide:
        mode = "711" if path == Path("/root") else "755"
        lines.append(f"mount -t tmpfs -o mode={mode},size=64k azlc-hide {q(str(path))}")
    for tree in trees.expose:
        if tree not in staged:
            lines.append(f"mount --bind {q(str(tree))} {q(str(tree))}")
            lines.append(f"mount -o remount,bind,ro {q(str(tree))}")
    home = f"/home/{admin}"
    lines += [
        "mount -t tmpfs -o mode=755,size=64k azlc-home /home",
        f"mkdir {q(home)} && mount --bind /mnt/sandbox/home {q(home)}",
        *(f"mount --bind /mnt/sandbox/{q(src)} {q(dst)}"
          for src, dst in {**SANDBOX_BINDS, **(extra_binds or {})}.items()),
        "mount -t tmpfs -o mode=1777 azlc-shm /dev/shm",
    ]
    for i, tree in enumerate(staged):
        lines += [f"mkdir -p {q(str(tree))} && mount --move /mnt/t{i} {q(str(tree))}",
                  f"mount -o remount,bind,ro {q(str(tree))}"]
    lines += [
        "mount --bind /mnt/sandbox/mnt /mnt",
        "cd /",
        "exec " + " ".join(q(a) for a in then),
    ]
    return "\n".join(lines) + "\n"


def runuser_shim(admin: str) -> str:
    """A loopback-mode instance's /usr/sbin/runuser: there is no root there, and its one
    account is `admin`, so `runuser -u <admin> [--] CMD...` runs CMD as is (what runuser to
    oneself does); anything else fails, saying why."""
    q = shlex.quote
    return "\n".join([
        "#!/bin/sh",
        "# the local cloud (loopback mode): no root on this instance; one account, " + admin,
        f'if [ "$1" = -u ] && [ "$2" = {q(admin)} ]; then',
        "  shift 2",
        '  [ "$1" = -- ] && shift',
        '  exec "$@"',
        "fi",
        f"echo 'runuser: this local-cloud instance runs without root (loopback mode): only "
        f"runuser -u '{q(admin)}' -- COMMAND is possible' >&2",
        "exit 1",
        "",
    ])
