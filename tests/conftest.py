"""Shared fixtures that start real services: a Prefect server and the local cloud.

Both are started once per test session, on loopback, in temporary directories, and stopped at
the end. Tests that need them ask for `prefect_server` / `localcloud`; unit tests start nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Tests Ctrl-C their subprocesses (an interrupted provisioning must delete what it made). A
# session started in the background (`cmd &` in a script, nohup) inherits SIGINT ignored, and
# an ignored signal stays ignored across exec, so those children could not be interrupted.
# A handler of our own is reset to the default on exec: the children get Python's Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Isolate Prefect's home and settings before anything imports prefect.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="azm-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect-home")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_API_KEY", None)

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2, verify=False).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


class PrefectServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.log = root / "prefect-server.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.root / "server-home"),
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.root / 'prefect.db'}",
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_UI_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            # The server fetches Prefect's collection registry from GitHub when the UI asks
            # (work-pool forms): a dead loopback proxy keeps it on this machine, and it falls
            # back to the copy bundled with Prefect.
            HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
            NO_PROXY="127.0.0.1,localhost,::1",
        )
        return env

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=self.env(), stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_http(f"{self.api_url}/health", 300, self.proc, self.log)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def prefect_server():
    """A real `prefect server` on loopback; PREFECT_API_URL points at it for the whole session."""
    root = _SESSION_DIR / "prefect-server"
    root.mkdir(exist_ok=True)
    server = PrefectServer(root)
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        try:
            yield server
        finally:
            server.stop()
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def localcloud(prefect_server):
    """The local cloud, started as the CLI starts it; yields its localcloud.json as a dict.

    It saves the `localcloud` manifest block and the example templates in the session's
    Prefect server, and is stopped (every instance, process and namespace removed) at the end.
    """
    state_dir = _SESSION_DIR / "localcloud"
    cli = [sys.executable, "-m", "prefect_azmanagers.cli"]
    subprocess.run(
        cli + ["localcloud", "start", "--background", "--blob", "--state-dir", str(state_dir),
               "--prefect-api-url", prefect_server.api_url],
        check=True, env=dict(os.environ, PREFECT_API_URL=prefect_server.api_url), timeout=180,
    )
    info = json.loads((state_dir / "localcloud.json").read_text())
    try:
        yield info
    finally:
        subprocess.run(cli + ["localcloud", "stop", "--state-dir", str(state_dir)], timeout=180)


LEFTOVER_GRACE = 60.0  # s for deletions a test started to finish before its leftovers count


def _holdings(admin) -> tuple[set[str], set[str], int]:
    """The local cloud's instances (name/vmId), scale sets (resource group/name) and NIC count."""
    status = admin.status()
    return ({f"instance {i['name']} ({i['vm_id']})" for i in status["instances"]},
            {f"scale set {s['resource_group']}/{s['name']}" for s in status["scale_sets"]},
            status["nics"])


def _added(before: tuple[set[str], set[str], int], after: tuple[set[str], set[str], int]) -> list[str]:
    added = sorted((after[0] - before[0]) | (after[1] - before[1]))
    return added + ([f"{after[2] - before[2]} NIC(s)"] if after[2] > before[2] else [])


@pytest.fixture(autouse=True)
def _local_cloud_left_as_found(request):
    """After each e2e test that used the session's local cloud: it holds no instance, scale
    set or NIC that was not there before the test. Module-scoped fixtures made theirs before
    the first snapshot, so they are not counted; deletions a test started get LEFTOVER_GRACE."""
    if request.node.get_closest_marker("e2e") is None or "localcloud" not in request.fixturenames:
        yield
        return
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    with LocalCloudAdmin.from_info(request.getfixturevalue("localcloud")) as admin:
        before = _holdings(admin)
        yield
        deadline = time.monotonic() + LEFTOVER_GRACE
        while (left := _added(before, _holdings(admin))) and time.monotonic() < deadline:
            time.sleep(2)
    assert not left, f"the test left these in the local cloud: {left}"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
