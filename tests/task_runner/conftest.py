"""Fixtures of the runner's tests: `admin` (the local cloud's admin client) for the end-to-end
tests, and for the unit tests an in-process stand-in for `AzureCluster` isolating the adapter.

The stand-in keeps the engine's contract that matters to the adapter: callables travel as
cloudpickle bytes (so what cannot be pickled fails as it would on the wire, with
PayloadError), run on worker threads, and their return values travel back pickled too.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable

import cloudpickle
import pytest

from prefect_azmanagers.cluster.options import ClusterOptions
from prefect_azmanagers.cluster.usage import UsageReport, WorkerGauge
from prefect_azmanagers.cluster.usage import report as usage_report
from prefect_azmanagers.exceptions import PayloadError, WorkerLost
from prefect_azmanagers.localcloud.admin import LocalCloudAdmin


@pytest.fixture(scope="module")
def admin(localcloud):
    with LocalCloudAdmin.from_info(localcloud) as client:
        yield client


class FakeWorker:
    def __init__(self, id: int):
        self.id = id


class FakeCluster:
    def __init__(self, workers: int = 4, forward_ports: tuple[int, ...] = (), lose: int = 0,
                 cancel: int = 0, lost_after: Callable[[Any], None] | None = None):
        self.forward_ports = forward_ports
        self.manifest = None
        self.options = ClusterOptions(max_unrecorded=None)  # no recording watch: no engine here
        self.output_handler: Callable[[Any, str, str], None] = lambda w, s, line: None
        self.submitted: list[str] = []
        self.join_setups: list[Callable[[], Any]] = []
        self.cancelled_all = 0
        self.cancelled: list[concurrent.futures.Future[Any]] = []
        self.closed = 0
        self._lose = lose  # fail this many submissions with WorkerLost
        self._cancel = cancel  # then cancel this many before they start (as close() does)
        # run each call, then `lost_after(callable)`, then fail it with WorkerLost (the worker
        # died after the call returned, before its result reached the driver)
        self._lost_after = lost_after
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers)

    def start(self) -> "FakeCluster":
        return self

    def on_join(self, setup: Callable[[], Any]) -> None:
        self.join_setups.append(setup)

    def submit(self, fn: Callable[[], Any], *, label: str = "", payload: bytes | None = None
               ) -> concurrent.futures.Future[Any]:
        try:
            blob = payload if payload is not None else cloudpickle.dumps(fn)
        except Exception as exc:
            raise PayloadError(f"{label}: cannot pickle: {exc}") from exc
        with self._lock:
            self.submitted.append(label)
            lose, self._lose = self._lose > 0, max(self._lose - 1, 0)
            cancel = not lose and self._cancel > 0
            self._cancel -= cancel
        if lose or cancel:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            if lose:
                future.set_exception(WorkerLost("worker 1 (fake-0) lost: agent died"))
            else:
                future.cancel()
            return future
        return self._pool.submit(self._run, blob)

    def _run(self, blob: bytes) -> Any:
        self.output_handler(FakeWorker(1), "stdout", "hello from the fake worker")
        fn = cloudpickle.loads(blob)
        value = fn()
        if self._lost_after is not None:
            self._lost_after(fn)
            raise WorkerLost("worker 1 (fake-0) lost after the call returned")
        return cloudpickle.loads(cloudpickle.dumps(value))

    def cancel(self, future: concurrent.futures.Future[Any]) -> None:
        self.cancelled.append(future)
        future.cancel()

    def cancel_all(self) -> None:
        self.cancelled_all += 1

    def close(self) -> None:
        self.closed += 1
        self._pool.shutdown(wait=True)

    group = "fake"

    def usage(self) -> UsageReport:
        return usage_report([], requeued=0, gauge=WorkerGauge())


@pytest.fixture
def fake_cluster():
    """A factory of FakeClusters, each closed after the test."""
    made: list[FakeCluster] = []

    def make(**kwargs: Any) -> FakeCluster:
        made.append(FakeCluster(**kwargs))
        return made[-1]

    yield make
    for cluster in made:
        cluster.close()
