"""The Prefect side of detached jobs, run by a real process worker on this machine.

Everything but the VM is real: a `prefect server`, the VM's work pool and generic deployment,
`prefect worker start --type process`, the flow `run_detached` and its job process. The same
behaviours are checked on real detached VMs of the local cloud in test_detached_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from prefect_azmanagers.detached import DetachedJob, DetachedJobFailed, detachat, variablebundle
from prefect_azmanagers.detached.job import DetachedJobError


def chatty(n):
    import os
    import sys

    print("line 1 to stdout")
    print("to stderr", file=sys.stderr)
    sys.stdout.write("no newline at the end")
    sys.stdout.flush()
    os.system("echo from a child process")
    return {"n": n, "square": n * n}


def test_streams_status_wait_result(local_pool):
    vm, _ = local_pool
    job = detachat(vm, chatty, 7)
    assert job.status() in ("starting", "running", "done")
    assert job.wait(timeout=180) == "done"
    assert job.result() == {"n": 7, "square": 49}
    out = job.read()
    assert out.startswith("line 1 to stdout\n")
    assert "no newline at the end" in out and "from a child process\n" in out
    assert job.read("stderr") == "to stderr\n"
    again = DetachedJob.from_flow_run_id(job.flow_run_id)
    assert again.result() == {"n": 7, "square": 49} and again.status() == "done"


def test_order_and_long_lines(local_pool):
    vm, _ = local_pool

    def many():
        for i in range(500):
            print(i)
        print("x" * 200_000)
        return None

    job = detachat(vm, many)
    job.wait(timeout=180)
    lines = job.read().split("\n")
    assert lines[:500] == [str(i) for i in range(500)]
    assert lines[500] == "x" * 200_000 and lines[501:] == [""]


def test_failure_reports_traceback(local_pool):
    vm, _ = local_pool

    def boom():
        print("before")
        raise ValueError("bad value 42")

    job = detachat(vm, boom)
    assert job.wait(timeout=180) == "failed"
    err = job.read("stderr")
    assert "Traceback" in err and "ValueError: bad value 42" in err
    with pytest.raises(DetachedJobFailed) as info:
        job.result()
    assert isinstance(info.value.__cause__, ValueError)
    assert "bad value 42" in info.value.traceback


def test_variablebundle_arrives(local_pool):
    vm, _ = local_pool
    variablebundle.update(session="s-123", weights=[1, 2, 3])
    try:
        def read_bundle():
            from prefect_azmanagers import variablebundle as bundle
            return bundle["session"], sum(bundle["weights"])

        job = detachat(vm, read_bundle)
        assert job.result(timeout=180) == ("s-123", 6)
    finally:
        variablebundle.clear()


def test_kill_stops_the_job_process(local_pool):
    vm, home = local_pool
    marker = f"azm-sleeper-{os.getpid()}"

    def sleeper(tag):
        import time
        print("sleeping", flush=True)
        time.sleep(600)

    job = detachat(vm, sleeper, marker)
    deadline = time.monotonic() + 120
    while "sleeping" not in job.read() and time.monotonic() < deadline:
        time.sleep(1)
    jobs = [p for p in psutil.process_iter(["cmdline"])
            if "prefect_azmanagers.detached.jobprocess" in " ".join(p.info["cmdline"] or [])
            and job.flow_run_id in " ".join(p.info["cmdline"] or [])]
    assert len(jobs) == 1
    assert job.kill(timeout=120) == "cancelled"
    gone, alive = psutil.wait_procs(jobs, timeout=30)
    assert not alive
    with pytest.raises(DetachedJobError, match="cancelled"):
        job.result()


def test_job_outlives_the_process_that_started_it(local_pool, tmp_path):
    vm, _ = local_pool
    script = tmp_path / "start.py"
    script.write_text(
        "import sys\n"
        "from prefect_azmanagers.detached import detachat\n"
        "from prefect_azmanagers.detached.vm import DetachedVM\n"
        "def job():\n"
        "    import time\n"
        "    time.sleep(3)\n"
        "    print('finished after the starter left')\n"
        "    return 'ok'\n"
        f"vm = DetachedVM(name={vm.name!r}, private_ip='127.0.0.1', vm_id='none', "
        "resource_group='none', admin_username='none')\n"
        "print(detachat(vm, job).flow_run_id)\n"
    )
    started = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=120, env=os.environ)
    assert started.returncode == 0, started.stderr
    flow_run_id = started.stdout.strip().splitlines()[-1]
    reader = subprocess.run(
        [sys.executable, "-c",
         "import sys; from prefect_azmanagers.detached import DetachedJob\n"
         "j = DetachedJob.from_flow_run_id(sys.argv[1])\n"
         "print(j.wait(180), j.result(), repr(j.read()))", flow_run_id],
        capture_output=True, text=True, timeout=240, env=os.environ)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.strip() == "done ok 'finished after the starter left\\n'"


def test_unknown_flow_run_id_is_a_clear_error(prefect_server):
    with pytest.raises(DetachedJobError, match="not a flow-run id"):
        DetachedJob.from_flow_run_id("nope")
    with pytest.raises(DetachedJobError, match="no flow run"):
        DetachedJob.from_flow_run_id("00000000-0000-0000-0000-000000000000")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect_azmanagers.cli", *args],
                          capture_output=True, text=True, timeout=240, env=os.environ)


def test_job_cli(local_pool):
    vm, _ = local_pool

    def two_streams():
        import sys
        print("out line")
        print("err line", file=sys.stderr)
        raise SystemExit(3)

    job = detachat(vm, two_streams)
    waited = _cli("job", "wait", job.flow_run_id, "--timeout", "180")
    assert (waited.returncode, waited.stdout.strip()) == (1, "failed")
    assert _cli("job", "status", job.flow_run_id).stdout.strip() == "failed"
    assert _cli("job", "logs", job.flow_run_id).stdout == "out line\n"
    assert _cli("job", "logs", job.flow_run_id, "--stderr").stdout.startswith("err line\n")
    unknown = _cli("job", "status", "not-a-uuid")
    assert unknown.returncode == 1 and "not a flow-run id" in unknown.stderr
    assert "Traceback" not in unknown.stderr
