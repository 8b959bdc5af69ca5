"""The services a benchmark needs, started the way the tests start them and always stopped:
a `prefect server` on a free loopback port (SQLite in a temp dir, or PostgreSQL + Redis started
by scripts/services.sh) and the local cloud."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


STATES = ("Completed", "Failed", "Crashed", "Cancelled", "Running", "Pending", "Scheduled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def bench_environment() -> str | None:
    """Before prefect is imported: every process of the run (children inherit it) sees one
    API URL and a Prefect home of the run's own, unless given. Returns that home (None if the
    caller gave one), for the bench to remove at its end. A `kill` (SIGTERM) stops the bench
    as Ctrl-C does, so its services (server, database, local cloud) are stopped too."""
    signal.signal(signal.SIGTERM, _interrupted)
    os.environ.setdefault("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    if "PREFECT_HOME" in os.environ:
        return None
    os.environ["PREFECT_HOME"] = home = tempfile.mkdtemp(prefix="azm-bench-home-")
    return home


RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, report: dict, when: str) -> Path:
    """A bench's report as JSON under bench/results/, named after it and its start time."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}-{when.replace(':', '')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {out}")
    return out


SERVICES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "services.sh"


@contextlib.contextmanager
def database_services(root: Path, kind: str) -> Iterator[dict[str, str]]:
    """The server environment for `kind`: "sqlite" (a file in `root`, nothing to start) or
    "postgres" (PostgreSQL + Redis messaging from scripts/services.sh, stopped at the end)."""
    if kind == "sqlite":
        yield {"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}"}
        return
    if kind != "postgres":
        raise ValueError(f"server kind {kind!r}: use 'sqlite' or 'postgres'")
    where = root / "services"
    where.mkdir(parents=True)
    root.chmod(0o711)  # PostgreSQL runs as the postgres account under root
    script = ["bash", str(SERVICES_SCRIPT)]
    subprocess.run(script + ["start", "--dir", str(where), "--pg-port", str(free_port()),
                             "--redis-port", str(free_port())], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    try:
        env = (where / "prefect-server.env").read_text().splitlines()
        yield dict(line.split("=", 1) for line in env if "=" in line)
    finally:
        subprocess.run(script + ["stop", "--dir", str(where)], timeout=120,
                       stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def prefect_server(root: Path, api_url: str, database: dict[str, str] | None = None
                   ) -> Iterator[str]:
    """A Prefect server on loopback at `api_url` (http://127.0.0.1:PORT/api); yields it.

    `database`: the server's database/messaging environment (`database_services`); SQLite in
    `root` by default. Its output is in `root`/prefect-server.log."""
    port = int(api_url.rsplit(":", 1)[1].split("/")[0])
    env = dict(os.environ, PREFECT_HOME=str(root / "server-home"),
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_UI_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               # its outbound HTTP (the collection registry on GitHub) to a dead loopback port
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               NO_PROXY="127.0.0.1,localhost,::1")
    env.update(database or {})
    log = root / "prefect-server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield api_url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def local_cloud(root: Path, api_url: str) -> Iterator[dict]:
    """The local cloud (saves the `localcloud` blocks in the server); yields localcloud.json."""
    state_dir = root / "localcloud"
    cli = [sys.executable, "-m", "prefect_azmanagers.cli", "localcloud"]
    subprocess.run(cli + ["start", "--background", "--state-dir", str(state_dir),
                          "--prefect-api-url", api_url],
                   check=True, env=dict(os.environ, PREFECT_API_URL=api_url), timeout=180,
                   stdout=subprocess.DEVNULL)
    try:
        yield json.loads((state_dir / "localcloud.json").read_text())
    finally:
        subprocess.run(cli + ["stop", "--state-dir", str(state_dir)], timeout=180,
                       stdout=subprocess.DEVNULL)


def recorded(api_url: str, flow_run_id: str, n: int, settle: float) -> dict[str, int]:
    """Task runs of the flow run in the API by state name, once n are final (or `settle` s)."""
    deadline = time.monotonic() + settle
    while True:
        counts = {}
        for name in STATES:
            answer = httpx.post(f"{api_url}/task_runs/count", timeout=60, json={
                "flow_runs": {"id": {"any_": [flow_run_id]}},
                "task_runs": {"state": {"name": {"any_": [name]}}}})
            answer.raise_for_status()
            if answer.json():
                counts[name] = answer.json()
        final = sum(counts.get(s, 0) for s in ("Completed", "Failed", "Crashed", "Cancelled"))
        if final >= n or time.monotonic() > deadline:
            return counts
        time.sleep(2.0)
