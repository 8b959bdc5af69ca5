"""Process helpers for the sandboxes and the cloud's services: run a command without blocking
the loop, tell whether a process still runs, find and end the processes that live in a network
namespace."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path


class CommandError(RuntimeError):
    """A helper command (ip, useradd, ssh-keygen, ...) failed; carries its stderr."""

    def __init__(self, argv: list[str], returncode: int, stderr: str):
        self.argv, self.returncode, self.stderr = argv, returncode, stderr
        super().__init__(f"{' '.join(argv)} exited with {returncode}: {stderr.strip()}")


async def run(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    """Run `argv` as a subprocess (clean environment) and return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=CLEAN_ENV,
        cwd="/",
    )
    out, err = await proc.communicate(input)
    if check and proc.returncode != 0:
        raise CommandError(list(argv), proc.returncode, err.decode(errors="replace"))
    return out.decode(errors="replace")


# What cloud-init and sshd would start with: nothing of the local cloud's own environment
# (PREFECT_API_URL, PYTHONPATH, ...) may leak into an instance.
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
}


def pids_in_namespace(ns_file: Path | str, kind: str = "net") -> list[int]:
    """Every live process whose `kind` namespace ("net", "mnt", ...) is the one `ns_file` names
    (a file bound by `ip netns`, or /proc/PID/ns/KIND of a process or an open fd). Processes
    of other users that we may not inspect are skipped."""
    try:
        target = os.stat(ns_file)
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/{kind}")
        except OSError:  # gone, a zombie, a kernel thread, or not ours
            continue
        if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
            pids.append(int(entry.name))
    return pids


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (e.g. sshd's per-connection processes)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces: ppid follows the last ')'
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """`pid` runs: it exists and is not a zombie (reaped here when it is our child). A zombie
    has closed its sockets and files."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until `pid` no longer runs (a signal is delivered asynchronously: a killed process
    may hold its sockets for a moment); False if it still runs after `timeout` s."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


async def end_namespace_processes(ns_file: Path | str, grace: float, kind: str = "net") -> None:
    """SIGTERM every process of the namespace, SIGKILL what is left after `grace` seconds, and
    repeat until none is left (processes may fork while we kill)."""
    if grace > 0:
        signal_all(pids_in_namespace(ns_file, kind), signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace
        while pids_in_namespace(ns_file, kind) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    for _ in range(100):
        pids = pids_in_namespace(ns_file, kind)
        if not pids:
            return
        signal_all(pids, signal.SIGKILL)
        await asyncio.sleep(0.02)
    raise RuntimeError(f"processes {pids_in_namespace(ns_file, kind)} in {ns_file} survive SIGKILL")
