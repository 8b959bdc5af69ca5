"""Fixtures of the customenv end-to-end tests: packages the driver has and instances lack."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

from .wheels import build_wheel


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
