"""Several flow runs at once (issue 11): concurrent clusters never share instances by accident.

Two flow processes started at the same moment with the same template and default options each
run on a scale set of their own, and each cleans up only what it made: nothing is left. A
cluster naming a scale set that another live cluster holds is refused before it provisions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.exceptions import ScaleSetInUse
from tests.task_runner.test_runner_e2e import new_group

pytestmark = pytest.mark.e2e

DEFAULTS_FLOW = '''
import json, socket, sys
from prefect import flow, task
from prefect_azmanagers import AzureScaleSetTaskRunner

@task
def where(i):
    import socket, time
    time.sleep(0.5)
    return socket.gethostname()

@flow(task_runner=AzureScaleSetTaskRunner("localcloud-small", 1, manifest="localcloud"))
def sweep():
    from prefect.context import get_run_context
    hosts = sorted(set(where.map(range(6)).result()))
    group = get_run_context().task_runner.cluster.group
    return hosts, group

hosts, group = sweep()
print("RESULT " + json.dumps({"hosts": hosts, "group": group}), flush=True)
'''


def ours_left(admin, groups: set[str]) -> list[dict]:
    status = admin.status()
    return ([i for i in status["instances"] if i["scale_set"] in groups]
            + [s for s in status["scale_sets"] if s["name"] in groups])


def test_two_flows_at_once_with_defaults_run_on_instances_of_their_own(localcloud, admin,
                                                                        prefect_server, tmp_path):
    script = tmp_path / "defaults_flow.py"
    script.write_text(DEFAULTS_FLOW)
    env = dict(os.environ, PREFECT_API_URL=prefect_server.api_url)
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=420)
            assert proc.returncode == 0, out[-4000:]
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = [json.loads(next(line for line in out.splitlines()
                               if line.startswith("RESULT "))[len("RESULT "):]) for out in outputs]
    groups = {r["group"] for r in results}
    assert len(groups) == 2, results   # a scale set each
    first, second = (set(r["hosts"]) for r in results)
    assert first and second and not first & second, results   # no instance shared
    assert ours_left(admin, groups) == []


def test_a_named_scale_set_held_by_a_live_cluster_is_refused(localcloud, admin):
    group = new_group("held")
    with AzureCluster("localcloud-small", 1, manifest="localcloud", group=group,
                      progress=False, join_timeout=300) as holder:
        intruder = AzureCluster("localcloud-small", 1, manifest="localcloud", group=group,
                                progress=False, join_timeout=300)
        with pytest.raises(ScaleSetInUse, match=f"in use by cluster {holder.cluster_id}"):
            intruder.start()
        assert holder.submit(lambda: "still mine").result(timeout=300) == "still mine"
        assert len([i for i in admin.status()["instances"] if i["scale_set"] == group]) == 1
    assert ours_left(admin, {group}) == []
