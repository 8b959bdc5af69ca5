"""The suite's CPU accounting plugin (tests/cpu_account.py): a test's figure counts the CPU of
the processes it starts, and the report ranks files by it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.cpu_account import CPUACCT, report

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass\n"


def test_a_child_process_cpu_counts_for_its_test_and_the_report_ranks_files(tmp_path: Path):
    assert os.access(CPUACCT, os.W_OK), f"the suite runs as root with cgroup-v1 cpuacct at {CPUACCT}"
    tests = tmp_path / "probe"
    tests.mkdir()
    (tests / "test_costly.py").write_text(textwrap.dedent(f"""
        import subprocess, sys

        def test_child_burns_a_second():
            subprocess.run([sys.executable, "-c", {BURN.format(seconds=1.0)!r}], check=True)
        """))
    (tests / "test_cheap.py").write_text("def test_nothing():\n    pass\n")
    out = tmp_path / "cpu"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.cpu_account", "-p", "no:cacheprovider",
         str(tests)], cwd=Path(__file__).resolve().parents[1],
        env=dict(os.environ, AZM_TEST_CPU=str(out)), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr

    account = json.loads((out / "main.json").read_text())
    cpu = {nodeid.split("::")[1]: seconds for nodeid, seconds, _ in account["tests"]}
    assert cpu["test_child_burns_a_second"] >= 0.9, cpu   # the child's second, not the test's own few ms
    assert cpu["test_nothing"] < 0.5, cpu
    emptied = [p.parent.name for p in CPUACCT.glob("azm-tests-main-*/cgroup.procs") if not p.read_text().strip()]
    assert emptied == [], "the run left its emptied cgroup behind"
    files = [Path(line.split()[-1]).name for line in report(out).splitlines() if line.endswith(".py")]
    assert files == ["test_costly.py", "test_cheap.py"], report(out)
