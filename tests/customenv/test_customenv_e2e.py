"""customenv end to end on the local cloud: a flow whose task imports packages that the driver
has but the instances' base Python lacks runs with customenv=True and fails clearly without.

Two packages, both built by the test (offline): `azm_shipped` installed on the driver from a
wheel file (a local-path install: shipped inside customData) and `azm_indexed` installed by
name from a find-links directory (pinned; the instance's pip gets it from the same directory,
named by the driver's pip configuration)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from prefect import flow, task

from prefect_azmanagers.localcloud.admin import LocalCloudAdmin
from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

from .wheels import build_wheel

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def admin(localcloud):
    with LocalCloudAdmin.from_info(localcloud) as client:
        yield client


@pytest.fixture
def driver_packages(monkeypatch):
    """The two packages installed into a directory on the driver's sys.path (not into .venv,
    which other tests share); the find-links directory lives where instances can read it
    (/var/tmp: instances get their own /tmp and /home)."""
    links = Path(tempfile.mkdtemp(prefix="azm-customenv-links-", dir="/var/tmp"))
    links.chmod(0o755)
    work = Path(tempfile.mkdtemp(prefix="azm-customenv-"))
    try:
        shipped = build_wheel(work, "azm-shipped", "1.2.0",
                              {"azm_shipped/__init__.py": "VALUE = 'shipped'\n"})
        build_wheel(links, "azm-indexed", "0.7.0", {"azm_indexed.py": "VALUE = 'indexed'\n"})
        site = work / "site"
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
               "--target", str(site)]
        subprocess.run([*pip, str(shipped)], check=True)
        subprocess.run([*pip, "--find-links", str(links), "azm-indexed==0.7.0"], check=True)
        monkeypatch.syspath_prepend(str(site))
        monkeypatch.setenv("PIP_FIND_LINKS", str(links))
        yield
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(links, ignore_errors=True)
        for name in ("azm_shipped", "azm_indexed"):
            sys.modules.pop(name, None)


@task
def use_driver_packages() -> tuple[str, str, str]:
    import sys

    import azm_indexed
    import azm_shipped

    return azm_shipped.VALUE, azm_indexed.VALUE, sys.prefix


def run_flow(group: str, customenv: bool):
    @flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 1, manifest="localcloud",
                                              group=group, customenv=customenv,
                                              join_timeout=600))
    def imports_driver_packages():
        return use_driver_packages.submit().result()

    return imports_driver_packages(return_state=True)


def test_task_needing_driver_packages_runs_only_with_customenv(localcloud, admin, driver_packages):
    import azm_indexed  # noqa: F401 - the driver itself has both packages
    import azm_shipped  # noqa: F401

    group = f"cenv-{uuid.uuid4().hex[:6]}"
    state = run_flow(group, customenv=True)
    assert state.is_completed(), state
    shipped, indexed, prefix = state.result()
    assert (shipped, indexed) == ("shipped", "indexed")
    assert prefix == "/home/azureuser/.azmanagers/env"

    state = run_flow(group, customenv=False)
    assert state.is_failed()
    with pytest.raises(ModuleNotFoundError, match="azm_indexed|azm_shipped"):
        state.result()
    assert [i for i in admin.status()["instances"] if i["scale_set"] == group] == []


def test_failed_install_fails_the_join_with_pips_tail(localcloud, admin):
    from prefect_azmanagers.cluster.cluster import AzureCluster
    from prefect_azmanagers.customenv import EnvironmentSpec
    from prefect_azmanagers.exceptions import JoinTimeout

    group = f"cenvfail-{uuid.uuid4().hex[:6]}"
    spec = EnvironmentSpec("test", ("azm-no-such-package==9.9",), (), ("--no-index",))
    cluster = AzureCluster("localcloud-small", 1, manifest="localcloud", group=group,
                           customenv=spec, waitfor=True, max_replacements=0, join_timeout=300,
                           progress=False)
    with pytest.raises(JoinTimeout) as info:
        cluster.start()
    cluster.close()
    message = str(info.value)
    assert "customenv: pip install failed" in message
    assert "No matching distribution found for azm-no-such-package==9.9" in message
    assert [i for i in admin.status()["instances"] if i["scale_set"] == group] == []
