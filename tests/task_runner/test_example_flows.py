"""The example flows in flows/ run on the local cloud (the demo exactly as scripts/demo runs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

FLOWS = Path(__file__).resolve().parents[2] / "flows"


def test_demo_runs_the_sweep_and_prints_the_flow_run_page(localcloud, prefect_server):
    out = subprocess.run(
        [sys.executable, str(FLOWS / "demo.py")], capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PREFECT_API_URL=prefect_server.api_url),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best fit: amplitude=3 frequency=2 " in out.stdout
    match = re.search(r"Flow run in the Prefect UI: (\S+)/runs/flow-run/([0-9a-f-]{36})", out.stdout)
    assert match and match.group(1) == prefect_server.ui_url

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(match.group(2)).state.is_completed()


@pytest.mark.slow
def test_hello_cluster_and_map_reduce(localcloud, monkeypatch):
    monkeypatch.syspath_prepend(str(FLOWS))
    import hello_cluster
    import map_reduce

    places = hello_cluster.hello_cluster(8)
    assert len({p.split(" (")[0] for p in places}) == 2  # two instances
    counts = map_reduce.map_reduce(9)
    expected = sum((map_reduce.count_words.fn(i) for i in range(9)), Counter())
    assert counts == dict(expected)
