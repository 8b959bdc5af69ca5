"""A pytest plugin (`-p tests.ordering`, as scripts/test runs the suite): the longest files go
first, by the time each took in an earlier run (tests/durations.json), and a worker is handed
its next file only once it runs the last test of its current one.

Under `--dist loadfile` a file is one unit of work, handed out in queue order (with
`--no-loadscope-reorder`; xdist's own reorder puts files with the most tests first, which are
quick unit files here). A long file handed out last makes the whole run wait for it alone;
handed out first, the quick files fill the other workers around it (longest first is the
classic rule for packing jobs on a few machines). A file with no recorded time counts as long
when it is end-to-end, as quick otherwise.

xdist hands a worker its next file while two tests of the current one are still pending. Two
end-to-end tests can take a minute or more, and the file handed out waits behind them while
other workers may sit idle at the end of the run. One pending test is the least xdist works
with: a worker keeps its last test back until it knows what comes next.

`AZM_TEST_DURATIONS=write` records this run's time per file into tests/durations.json (files
this run did not touch keep their old times).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DURATIONS = Path(__file__).with_name("durations.json")


def _recorded() -> dict[str, float]:
    try:
        return json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    recorded = _recorded()
    longest = max(recorded.values(), default=0.0)

    def expected(path: str) -> float:
        if path in recorded:
            return recorded[path]
        return longest if any(item.get_closest_marker("e2e") for item in files[path]) else 0.0

    items[:] = [item for path in sorted(files, key=expected, reverse=True) for item in files[path]]


def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN201 (xdist's type)
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class NextFileAtTheLastTest(LoadFileScheduling):
        def _reschedule(self, node) -> None:  # noqa: ANN001
            if not node.shutting_down and self.workqueue \
                    and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return NextFileAtTheLastTest(config, log)


class DurationRecorder:
    """Sums setup, call and teardown time per file, as the controller receives the reports."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        path = report.nodeid.split("::", 1)[0]
        self.times[path] = self.times.get(path, 0.0) + report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config, "workerinput"):   # an xdist worker: the controller writes
            return
        times = {**_recorded(), **{path: round(t, 1) for path, t in self.times.items()}}
        DURATIONS.write_text(json.dumps(dict(sorted(times.items())), indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("AZM_TEST_DURATIONS") == "write":
        config.pluginmanager.register(DurationRecorder(), "azm-durations")
