"""Fixtures of the azure-vm worker tests: a git repository of flows the VMs clone, an azure-vm
work pool, `prefect worker start` as a subprocess, and what a flow run leaves behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

FLOWS = textwrap.dedent('''
    import os
    import socket
    import time

    from prefect import flow, get_run_logger


    @flow
    def hello(name: str = "world"):
        get_run_logger().info("hello %s from %s", name, socket.gethostname())
        return socket.gethostname()


    @flow
    def fails():
        raise ValueError("this flow fails on purpose")


    @flow
    def sleeper(seconds: float = 900, release: str = ""):
        """Sleeps `seconds`, or less once the file `release` exists (the test says when)."""
        get_run_logger().info("sleeper started on %s", socket.gethostname())
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (release and os.path.exists(release)):
            time.sleep(0.5)


    @flow(persist_result=True)
    def persisted(n: int = 4):
        return {"squares": [i * i for i in range(n)], "host": socket.gethostname()}
''')


@dataclass(frozen=True)
class FlowsRepo:
    url: str
    gitconfig: str


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
                            GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com"))


@pytest.fixture(scope="session")
def flows_repo():
    """A bare git repository holding flows.py, at a path the local cloud's VMs see (/var/tmp is
    the host's on an instance, like a git server would be on Azure); yields its file:// URL."""
    root = Path(tempfile.mkdtemp(prefix="azm-worker-flows-", dir="/var/tmp"))
    try:
        work = root / "work"
        work.mkdir()
        (work / "flows.py").write_text(FLOWS)
        _git("init", "-q", "-b", "main", cwd=work)
        _git("add", "flows.py", cwd=work)
        _git("commit", "-q", "-m", "flows", cwd=work)
        _git("clone", "-q", "--bare", str(work), str(root / "flows.git"), cwd=root)
        # The VMs' admin user is another local account: git refuses a repository it does not
        # own unless told it is safe (GIT_CONFIG_GLOBAL in the deployments' env).
        (root / "gitconfig").write_text("[safe]\n\tdirectory = *\n")
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield FlowsRepo(f"file://{root / 'flows.git'}", str(root / "gitconfig"))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cli(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def vm_pool(localcloud, flows_repo):
    """An azure-vm work pool made with `prefect work-pool create --type azure-vm`, shared by a
    module's tests (each deploys its own flows in it and leaves no VM behind), and
    deploy(entrypoint, name, **job_variables) -> "flow/deployment" of flows.py in it."""
    from prefect import get_client

    pool = f"azmpool-{uuid.uuid4().hex[:6]}"
    cli("work-pool", "create", pool, "--type", "azure-vm")
    with get_client(sync_client=True) as client:
        def deploy(entrypoint: str, name: str, parameters: dict | None = None, **job_variables):
            flow_id = client.create_flow_from_name(entrypoint.rsplit(":", 1)[1])
            client.create_deployment(
                flow_id, name, work_pool_name=pool, entrypoint=entrypoint,
                pull_steps=[{"prefect.deployments.steps.git_clone": {"repository": flows_repo.url}}],
                parameters=parameters or {}, enforce_parameter_schema=False,
                job_variables={"manifest": "localcloud", "vm_template": "localcloud-vm",
                               "nic_template": "localcloud-nic", "basename": pool,
                               "env": {"GIT_CONFIG_GLOBAL": flows_repo.gitconfig},
                               **job_variables})
            return f"{entrypoint.rsplit(':', 1)[1]}/{name}"

        deploy.pool = pool
        yield deploy
        for deployment in client.read_deployments():
            if deployment.work_pool_name == pool:
                client.delete_deployment(deployment.id)
        client.delete_work_pool(pool)


class WorkerProcess:
    """`prefect worker start --pool POOL` in a subprocess; its output in `log`."""

    def __init__(self, pool: str, log: Path):
        self.pool, self.log = pool, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PREFECT_WORKER_QUERY_SECONDS="1",
                   PREFECT_WORKER_HEARTBEAT_SECONDS="5")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while "started!" not in self.output():
            assert self.proc.poll() is None, f"the worker exited:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"the worker did not start:\n{self.output()[-3000:]}"
            time.sleep(0.5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def _pool_worker(vm_pool, tmp_path_factory):
    worker = WorkerProcess(vm_pool.pool, tmp_path_factory.mktemp("worker") / "worker.log")
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def vm_worker(_pool_worker):
    """The running worker of the `vm_pool`, shared by a module's tests (stopped after the last
    one). What it logged during the test (the VMs' engine output among it) is printed at the
    test's teardown: pytest shows it when the test failed."""
    start = len(_pool_worker.output())
    yield _pool_worker
    print(f"--- the worker's log during the test ---\n{_pool_worker.output()[start:][-30000:]}")


def leftovers(localcloud_info: dict, pool: str) -> list[str]:
    """ARM VMs and NICs and local-cloud instances of the pool's flow runs (named pool-xxxxxx)."""
    from tests.cloud_leftovers import cloud_leftovers

    return cloud_leftovers(localcloud_info, f"{pool}-")


def eventually(probe, what: str, timeout: float, interval: float = 1.0):
    """probe()'s first truthy result, polled every `interval` s; fails after `timeout` s
    with `what` and probe's last result."""
    deadline = time.monotonic() + timeout
    while not (result := probe()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(interval)
    return result


@pytest.fixture
def assert_nothing_left(localcloud):
    """Wait until the pool has no VM, NIC or instance left; fail with what remains."""
    def check(pool: str, timeout: float = 60) -> None:
        remaining: list[str] = []

        def nothing() -> bool:
            remaining[:] = leftovers(localcloud, pool)
            return not remaining

        try:
            eventually(nothing, "the deletion of the pool's VMs", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; left behind: {remaining}") from None

    return check
