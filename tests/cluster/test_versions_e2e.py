"""Version agreement at join on the local cloud: a worker whose Prefect minor differs is refused
with one error naming both sides and the fix, and nothing is left behind."""

from __future__ import annotations

import time

import pytest

from prefect_azmanagers.blocks import load_manifest, load_scaleset_template
from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.exceptions import JoinTimeout, VersionMismatch
from tests.cluster.test_engine_e2e import admin, assert_nothing_left, group_name  # noqa: F401

pytestmark = pytest.mark.e2e

# The instance's interpreter, wrapped: a sitecustomize makes it report prefect 3.8.0.
FAKE = """mkdir -p /home/azureuser/fakepy
cat > /home/azureuser/fakepy/sitecustomize.py <<'PY'
import prefect_azmanagers.cluster.versions as v
real = v._read_local
v._read_local = lambda: tuple((k, "3.8.0" if k == "prefect" else x) for k, x in real())
PY
printf '#!/bin/sh\\nPYTHONPATH=/home/azureuser/fakepy exec %s "$@"\\n' "$(command -v {python})" > /home/azureuser/fakepy/python
chmod 755 /home/azureuser/fakepy/python
chown -R azureuser: /home/azureuser/fakepy 2>/dev/null || true
"""


def test_a_worker_with_another_prefect_minor_is_refused(localcloud, admin):
    manifest = load_manifest("localcloud")
    template = load_scaleset_template("localcloud-small").model_copy(
        update={"tempdisk": FAKE.replace("{python}", manifest.python)})
    group = group_name("versions")
    cluster = AzureCluster(template, 1, manifest=manifest.model_copy(
        update={"python": "/home/azureuser/fakepy/python"}), group=group, progress=False, warm_up=None,
        join_timeout=240, waitfor=True, max_replacements=0)
    started = time.monotonic()
    with pytest.raises((VersionMismatch, JoinTimeout)) as info:
        cluster.start()
    message = str(info.value)
    print(f"versions: {message}\n{type(info.value).__name__} after {time.monotonic() - started:.1f} s")
    assert "prefect 3.8.0 on the worker, 3.9" in message and "Fix: use customenv=True" in message
    assert "Worker (/home/azureuser/fakepy/python): python " in message
    assert_nothing_left(admin, group, set())
