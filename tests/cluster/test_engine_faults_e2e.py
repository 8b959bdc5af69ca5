"""The engine end to end on the local cloud, when things go wrong before any work runs: boot
failures, allocation failures, join deadlines, SIGTERM and Ctrl-C during provisioning, a
wrong interpreter, a tunnel that cannot listen. Each leaves nothing behind. (Split from
test_engine_e2e.py, whose helpers it uses, so the two files run in parallel.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from prefect_azmanagers.blocks import load_scaleset_template
from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.exceptions import JoinTimeout, WorkerLost
from tests.cluster.test_engine_e2e import (  # noqa: F401 - admin is a fixture
    admin,
    assert_nothing_left,
    group_name,
    instances_of,
    wait_until,
)

pytestmark = pytest.mark.e2e


def test_boot_failure_gives_join_timeout_with_boot_log_and_leaves_nothing(localcloud, admin):
    group = group_name("bootfail")
    template = load_scaleset_template("localcloud-small").model_copy(
        update={"tempdisk": "echo preparing scratch space on purpose-fail; exit 3"})
    cluster = AzureCluster(template, 1, manifest="localcloud", group=group, progress=False, warm_up=None,
                           join_timeout=240, waitfor=True, max_replacements=0)
    with pytest.raises(JoinTimeout) as info:
        cluster.start()
    message = str(info.value)
    assert f"{group}_0" in message and "0 of 1 workers joined" in message
    assert "failed: exit 3" in message and "tempdisk" in message
    assert "preparing scratch space on purpose-fail" in message  # the cloud-init log tail
    assert_nothing_left(admin, group, set())


def test_allocation_failure_then_replacement_leaves_nothing(localcloud, admin, caplog):
    """The scale set's creation ends AllocationFailed; the failed instance is replaced (the
    default). Whether the replacement is refused with that failure or provisioned, the call
    ends one way or the other and the cluster deletes every instance and the scale set."""
    caplog.set_level("INFO", logger="prefect_azmanagers")  # the replacement's story, if it fails
    group = group_name("alloc")
    admin.fail_next_lro(1)
    try:
        with AzureCluster("localcloud-small", 1, manifest="localcloud", group=group,
                          progress=False, warm_up=None, join_timeout=240) as cluster:
            future = cluster.submit(lambda: 42)
            try:
                outcome = future.result(timeout=240)
            except WorkerLost as exc:
                outcome = str(exc)
            assert outcome == 42 or "Allocation failed" in outcome, outcome
    finally:
        admin.clear_faults()
    assert_nothing_left(admin, group, set())


def test_join_deadline_names_the_instance_that_did_not_join(localcloud, admin):
    group = group_name("slow")
    admin.settings(boot_delay=60)
    try:
        cluster = AzureCluster("localcloud-small", 1, manifest="localcloud", group=group,
                               progress=False, warm_up=None, join_timeout=15, waitfor=True, max_replacements=0)
        with pytest.raises(JoinTimeout) as info:
            cluster.start()  # raises after deleting what it made
    finally:
        admin.settings(boot_delay=0)
    message = str(info.value)
    assert f"{group}_0" in message and "within 15 s" in message
    assert_nothing_left(admin, group, set())


def test_sigterm_closes_the_cluster(localcloud, admin, tmp_path):
    group = group_name("sigterm")
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from prefect_azmanagers.cluster.cluster import AzureCluster
        cluster = AzureCluster("localcloud-small", 1, manifest="localcloud", group="{group}",
                               progress=False, warm_up=None, join_timeout=300, waitfor=True).start()
        print(cluster.submit(lambda: "joined").result(timeout=120), flush=True)
        time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ))
    try:
        assert driver.stdout.readline().strip() == "joined"
        assert len(instances_of(admin, group)) == 1
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(120) == -signal.SIGTERM
    finally:
        if driver.poll() is None:
            driver.kill()
    assert_nothing_left(admin, group, set())


def test_wrong_interpreter_is_reported_with_the_agents_stderr(localcloud, admin):
    from prefect_azmanagers.blocks import load_manifest

    group = group_name("nopython")
    manifest = load_manifest("localcloud").model_copy(update={"python": "/opt/missing/python3"})
    cluster = AzureCluster("localcloud-small", 1, manifest=manifest, group=group, progress=False, warm_up=None,
                           join_timeout=240, waitfor=True, max_replacements=0)
    with pytest.raises(JoinTimeout) as info:
        cluster.start()
    message = str(info.value)
    assert "exited before it started" in message and "/opt/missing/python3" in message
    assert "No such file or directory" in message
    assert_nothing_left(admin, group, set())


def test_ctrl_c_during_provisioning_deletes_what_was_made(localcloud, admin, tmp_path):
    group = group_name("sigint")
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        from prefect_azmanagers.cluster.cluster import AzureCluster
        with AzureCluster("localcloud-small", 2, manifest="localcloud", group="{group}",
                          progress=False, warm_up=None, join_timeout=600, waitfor=True) as cluster:
            print("joined", flush=True)
    """))
    admin.settings(boot_delay=30)
    try:
        driver = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ))
        try:
            wait_until(lambda: len(instances_of(admin, group)) == 2, 120, "instances requested")
            driver.send_signal(signal.SIGINT)  # while they boot: waitfor is still blocking
            assert driver.wait(240) != 0
        finally:
            if driver.poll() is None:
                driver.kill()
    finally:
        admin.settings(boot_delay=0)
    assert_nothing_left(admin, group, set())


def test_a_tunnel_that_cannot_listen_fails_the_calls_clearly(localcloud, admin):
    group = group_name("fwd")
    # port 80 on the instance's loopback: the admin user's sshd session may not listen there
    with AzureCluster("localcloud-small", 1, manifest="localcloud", group=group, progress=False, warm_up=None,
                      join_timeout=120, forward_ports=[80]) as cluster:
        future = cluster.submit(lambda: 1)
        with pytest.raises(WorkerLost, match="cannot listen on its 127.0.0.1 port 80"):
            future.result(timeout=150)
    assert_nothing_left(admin, group, set())
