"""known_hosts rewrites: concurrent writers lose no pin, readers and crashes never see a truncated file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import asyncssh
import pytest

from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
from prefect_azmanagers.exceptions import HostKeyMismatch

KEY = asyncssh.generate_private_key("ssh-ed25519")
KEY_FIELDS = KEY.export_public_key().decode().split()[:2]
STABLE = 20_000  # pins that every reader must always see (a large file makes a rewrite slow)


def _seed(path, count=STABLE, prefix="stable"):
    path.write_text("".join(f"{prefix}-{i} {KEY_FIELDS[0]} {KEY_FIELDS[1]} 10.0.0.4\n"
                            for i in range(count)))


def _assert_whole(path, stable=STABLE):
    text = path.read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert all(len(line.split()) == 4 for line in lines), "a partial line"
    assert sum(line.startswith("stable-") for line in lines) == stable
    return lines


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_writers_keep_every_pin_and_readers_never_see_a_partial_file(tmp_path):
    path = tmp_path / "known_hosts"
    _seed(path)
    for w in range(4):
        PinnedHostKeys(path).pin(f"doomed{w}-0", KEY, "10.0.0.5")
    writers = [_python(f"""
        import asyncssh
        from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
        store, key = PinnedHostKeys({str(path)!r}), asyncssh.generate_private_key("ssh-ed25519")
        for i in range(15):
            store.pin(f"w{w}-{{i}}", key, "10.0.1.{w}")
            store.forget({{f"doomed{w}-{{i}}"}})
            store.pin(f"doomed{w}-{{i + 1}}", key, "10.0.1.{w}")
    """) for w in range(4)]
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            text = path.read_text()
            seen.append((text.endswith("\n"), sum(line.startswith("stable-") for line in text.splitlines())))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for writer in writers:
            _, err = writer.communicate(timeout=300)
            assert writer.returncode == 0, err
    finally:
        stop.set()
        reader.join()
    assert len(seen) > 10 and all(ends and count == STABLE for ends, count in seen)
    lines = _assert_whole(path)
    pinned = {line.split()[0] for line in lines}
    assert {f"w{w}-{i}" for w in range(4) for i in range(15)} <= pinned
    assert {name for name in pinned if name.startswith("doomed")} == {f"doomed{w}-15" for w in range(4)}
    assert not (tmp_path / "known_hosts.tmp").exists()


@pytest.mark.parametrize("operation", ["forget", "pin"])
def test_a_crash_mid_write_leaves_the_old_file_whole(tmp_path, operation):
    path = tmp_path / "known_hosts"
    _seed(path)
    PinnedHostKeys(path).pin("doomed", KEY, "10.0.0.5")
    before = path.read_text()
    # The kernel kills the writer (SIGXFSZ) once a file it writes reaches half the old size.
    crash = _python(f"""
        import asyncssh, os, resource, signal
        from prefect_azmanagers.cluster.known_hosts import PinnedHostKeys
        store = PinnedHostKeys({str(path)!r})
        key = asyncssh.generate_private_key("ssh-ed25519")
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        size = os.path.getsize({str(path)!r})
        limit = size + 16 if {operation!r} == "pin" else size // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        if {operation!r} == "pin":
            store.pin("new-vm", key, "10.0.0.6")
        else:
            store.forget({{"doomed"}})
    """)
    crash.communicate(timeout=120)
    assert crash.returncode == -25  # SIGXFSZ: killed in the middle of a write
    assert path.read_text() == before
    # the lock died with the writer: the next change goes through
    store = PinnedHostKeys(path)
    store.forget({"doomed"})
    store.pin("after", KEY, "10.0.0.7")
    lines = _assert_whole(path)
    assert lines[-1].startswith("after ") and not any(line.startswith("doomed ") for line in lines)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_pinned_host_keys(tmp_path):
    store = PinnedHostKeys(tmp_path / "sub" / "known_hosts")
    first, second = (asyncssh.generate_private_key("ssh-ed25519") for _ in range(2))
    assert store.get("vm-1") is None and store.check("vm-1", first, "10.0.0.4") is False
    store.pin("vm-1", first, "10.0.0.4")
    store.pin("vm-2", second, "10.0.0.4")  # same address, another instance
    assert oct((tmp_path / "sub" / "known_hosts").stat().st_mode & 0o777) == "0o600"
    assert store.check("vm-1", first, "10.0.0.4") and store.check("vm-2", second, "10.0.0.4")
    with pytest.raises(HostKeyMismatch, match="vm-1 at 10.0.0.9.*delete the line"):
        store.check("vm-1", second, "10.0.0.9")
    store.forget({"vm-1"})
    assert store.get("vm-1") is None and store.get("vm-2") is not None
