"""The transport's trust rules through AzureCluster on the local cloud: `env=` values reach
the worker but no log line and no error message, and env.sh on the instance is 0600."""

from __future__ import annotations

import logging
import os

import pytest

from prefect_azmanagers.blocks import load_manifest
from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.exceptions import JoinTimeout
from tests.cluster.test_engine_e2e import admin, assert_nothing_left, group_name  # noqa: F401

pytestmark = pytest.mark.e2e

SECRET = "s3cret-token-value"


def _worker_view() -> tuple[str, int]:
    path = os.path.expanduser("~/.azmanagers/env.sh")
    return os.environ["TOKEN"], os.stat(path).st_mode & 0o777


def test_env_values_reach_the_worker_but_no_log_and_env_sh_is_private(localcloud, admin, caplog):
    caplog.set_level(logging.DEBUG)
    logging.getLogger("asyncssh").setLevel(logging.DEBUG)  # it logs each exec command at INFO
    group = group_name("redact")
    with AzureCluster("localcloud-small", 1, manifest="localcloud", group=group, progress=False,
                      join_timeout=240, waitfor=True, env={"TOKEN": SECRET}) as cluster:
        assert cluster.submit(_worker_view).result(timeout=240) == (SECRET, 0o600)
    assert "TOKEN=<redacted>" in caplog.text and SECRET not in caplog.text
    assert_nothing_left(admin, group, set())


def test_an_agent_that_cannot_start_is_reported_without_env_values(localcloud, admin, caplog):
    caplog.set_level(logging.DEBUG)
    manifest = load_manifest("localcloud").model_copy(update={"python": "/nonexistent/python3"})
    group = group_name("redact-fail")
    cluster = AzureCluster("localcloud-small", 1, manifest=manifest, group=group, progress=False,
                           join_timeout=240, waitfor=True, max_replacements=0,
                           env={"TOKEN": SECRET})
    with pytest.raises(JoinTimeout) as info:
        cluster.start()
    message = str(info.value)
    assert "/nonexistent/python3" in message and "TOKEN=<redacted>" in message
    assert SECRET not in message and SECRET not in caplog.text
    assert_nothing_left(admin, group, set())
