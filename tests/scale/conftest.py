"""Fixtures of the scale tests: a real `prefect server` on PostgreSQL with Prefect's Redis
messaging, both started by the project's own `scripts/services.sh` on loopback.

`postgres_prefect_server` is session-scoped and independent of the SQLite `prefect_server` of
tests/conftest.py (which the local cloud saves its blocks in); a test points Prefect at it with
`temporary_settings`. Its `services_env` holds the database and Redis URLs the server runs with,
its `log` the server's output.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, PrefectServer, free_port

SERVICES = REPO / "scripts" / "services.sh"


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


class ServicesPrefectServer(PrefectServer):
    """A Prefect server whose database (and messaging) are the given services'."""

    def __init__(self, root: Path, services_env: dict[str, str]):
        super().__init__(root)
        self.services_env = services_env

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.services_env}


@pytest.fixture(scope="session")
def postgres_prefect_server():
    """`prefect server` on a private PostgreSQL cluster + Redis (scripts/services.sh)."""
    # PostgreSQL runs as the `postgres` account under root: its directory must be reachable
    root = Path(tempfile.mkdtemp(prefix="azm-pg-"))
    root.chmod(0o711)
    services = ["bash", str(SERVICES)]
    where = ["--dir", str(root / "services")]
    subprocess.run(services + ["start", *where, "--pg-port", str(free_port()),
                               "--redis-port", str(free_port())],
                   check=True, timeout=300, stdout=subprocess.DEVNULL)
    server = None
    try:
        server = ServicesPrefectServer(root, read_env_file(root / "services" / "prefect-server.env"))
        server.start()
        yield server
    finally:
        if server is not None:
            server.stop()
        subprocess.run(services + ["stop", *where], timeout=120, stdout=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)
