"""CPU time per test, counted over each pytest process's whole tree of processes: the Prefect
server and local cloud it started, the VMs' sandboxes, agents, workers and flow runs. The suite
is CPU-bound on two cores (issue 16), so this, not wall time, says which tests cost the most.

Off unless `AZM_TEST_CPU=DIR` is set (root and a cgroup-v1 `cpuacct` hierarchy needed):

    AZM_TEST_CPU=/tmp/cpu bash scripts/test
    .venv/bin/python -m tests.cpu_account /tmp/cpu      # CPU-s per file and the costliest tests

Each pytest process (each xdist worker) moves itself into a cgroup of its own; every process it
starts, daemons included, is counted there. A test's figure includes its fixtures' setup and
teardown and whatever its process's services did meanwhile.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class _Account:
    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name
        self.group = CPUACCT / f"azm-tests-{name}-{os.getpid()}"
        self.group.mkdir()
        (self.group / "cgroup.procs").write_text(str(os.getpid()))
        self.start, self.rows = self.usage(), []

    def usage(self) -> float:
        return int((self.group / "cpuacct.usage").read_text()) / 1e9

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        cpu, wall = self.usage(), time.monotonic()
        yield
        self.rows.append([item.nodeid, round(self.usage() - cpu, 2), round(time.monotonic() - wall, 2)])

    def pytest_unconfigure(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.name}.json").write_text(
            json.dumps({"total": round(self.usage() - self.start, 1), "tests": self.rows}))
        (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))
        try:
            self.group.rmdir()
        except OSError:  # a process the tests started outlives them: the group stays with it
            pass


def pytest_configure(config: pytest.Config) -> None:
    out = os.environ.get("AZM_TEST_CPU")
    if not out:
        return
    if not os.access(CPUACCT, os.W_OK):
        raise pytest.UsageError(f"AZM_TEST_CPU needs root and a cgroup-v1 cpuacct hierarchy at {CPUACCT}")
    worker = getattr(config, "workerinput", {}).get("workerid", "main")  # xdist worker, or not
    config.pluginmanager.register(_Account(Path(out), worker))


def report(out: Path, top: int = 20) -> str:
    """CPU-s per test file (most first) and the `top` costliest tests, from a run's files."""
    total, files, wall, tests = 0.0, Counter(), Counter(), []
    for path in out.glob("*.json"):
        account = json.loads(path.read_text())
        total += account["total"]
        for nodeid, cpu, seconds in account["tests"]:
            name = nodeid.split("::")[0]
            files[name] += cpu
            wall[name] += seconds
            tests.append((cpu, seconds, nodeid))
    lines = [f"{total:.0f} CPU-s in all, {sum(files.values()):.0f} in tests", "",
             f"{'CPU-s':>8} {'wall s':>7}  file"]
    lines += [f"{cpu:8.1f} {wall[name]:7.0f}  {name}" for name, cpu in files.most_common()]
    lines += ["", f"{'CPU-s':>8} {'wall s':>7}  test"]
    lines += [f"{cpu:8.1f} {seconds:7.0f}  {nodeid}" for cpu, seconds, nodeid in sorted(tests, reverse=True)[:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1])))
