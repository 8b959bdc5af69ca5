"""The task runner facing an overloaded or vanished Prefect API, end to end: a real `prefect
server` behind a loopback proxy that answers 503 on command (tests/scale/api_proxy.py), workers
on the local cloud reaching it through the runner's SSH port forward.

- 503 for a while, then recovery: dispatch slows while the API refuses (the runner probes its
  /health), and the flow completes with every task run recorded Completed.
- The API stays down: the flow fails in bounded time with an error that names the API and its
  last answer, instead of hanging while the instances bill.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid

import pytest
from prefect import flow, task
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from prefect_azmanagers.blocks import AzureManifest, load_manifest
from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner
from tests.scale.api_proxy import FailingApiProxy
from tests.scale.test_postgres_e2e import recorded_states

pytestmark = pytest.mark.e2e

TASKS = 32


@task
def slow_square(x: int) -> int:
    time.sleep(0.5)
    return x * x


@pytest.fixture(scope="module")
def direct_manifest(localcloud, prefect_server) -> str:
    """The local cloud's manifest without `prefect_api_url_for_vms`: the runner forwards the
    driver's API port (the proxy's) to the instances over SSH."""
    fields = load_manifest("localcloud").model_dump(
        exclude={"prefect_api_url_for_vms", "blob_container"})
    AzureManifest(**fields).save("localcloud-via-proxy", overwrite=True)
    return "localcloud-via-proxy"


def done_count(futures) -> int:
    return sum(f.wrapped_future.done() for f in futures)


def wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_503_spell_slows_dispatch_and_the_flow_completes_with_every_run_recorded(
        direct_manifest, prefect_server, caplog):
    caplog.set_level("WARNING", logger="prefect_azmanagers.cluster")
    with FailingApiProxy(prefect_server.api_url) as proxy, \
            temporary_settings(updates={PREFECT_API_URL: proxy.api_url}):

        @flow(task_runner=AzureScaleSetTaskRunner(
            "localcloud-small", 2, manifest=direct_manifest, ppi=2, waitfor=True,
            join_timeout=300))
        def sweep() -> list[int]:
            futures = slow_square.map(range(TASKS))
            wait_for(lambda: done_count(futures) >= 6, 300)
            proxy.fail()                           # the API answers 503 for 12 s
            time.sleep(12)
            proxy.fail(False)
            return [f.result() for f in futures]

        state = sweep(return_state=True)
    assert state.is_completed(), state
    assert state.result() == [x * x for x in range(TASKS)]
    assert proxy.refused > 0
    assert any("dispatch slows" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    states = recorded_states(state.state_details.flow_run_id, TASKS)
    assert states == ["Completed"] * TASKS, states


def test_an_api_that_stays_down_fails_the_flow_in_bounded_time_with_a_clear_error(
        direct_manifest, prefect_server, caplog):
    caplog.set_level("ERROR", logger="prefect_azmanagers.cluster")
    outage: dict[str, float] = {}
    # Prefect's client retries each of the flow's final writes (its state, the usage
    # artifact) 5 times with backoff against the dead API: its own time, not the runner's.
    with FailingApiProxy(prefect_server.api_url) as proxy, \
            temporary_settings(updates={PREFECT_API_URL: proxy.api_url,
                                        PREFECT_CLIENT_MAX_RETRIES: 1}):

        @flow(task_runner=AzureScaleSetTaskRunner(
            "localcloud-small", 1, manifest=direct_manifest, waitfor=True, join_timeout=300,
            api_give_up_after=15))
        def forever() -> list[int]:
            futures = slow_square.map(range(TASKS))
            wait_for(lambda: done_count(futures) >= 2, 300)
            outage["started"] = time.monotonic()
            proxy.fail(close_websockets=True)      # the API is gone for good
            concurrent.futures.wait([f.wrapped_future for f in futures], timeout=600)
            outage["ended"] = time.monotonic()
            return [f.result() for f in futures]

        with pytest.raises(Exception) as raised:
            forever()
    took = outage["ended"] - outage["started"]
    print(f"API down -> every task run ended: {took:.1f} s")
    assert took < 15 + 60  # the bound, a few probes, and slack for a loaded machine
    errors = [r.getMessage() for r in caplog.records if "has answered only failures" in r.getMessage()]
    assert errors and proxy.api_url in errors[0] and "HTTP 503" in errors[0], errors
    chain, exc = [], raised.value
    while exc is not None:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    print("raised:", chain)
    assert any("has answered only failures" in link or "PrefectAPIUnreachable" in link
               for link in chain), chain
