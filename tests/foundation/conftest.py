"""Fixtures of the foundation tests: the reference ~/.azmanagers folder, copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).parent / "data" / "azmanagers"


@pytest.fixture
def azmanagers_dir(tmp_path: Path) -> Path:
    """A writable copy of the reference AzManagers folder (manifest + three template files)."""
    target = tmp_path / "azmanagers"
    shutil.copytree(REFERENCE_DIR, target)
    return target
