"""The Prefect adapter against an in-process fake engine and a real Prefect server."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.context import FlowRunContext, SettingsContext
from prefect.futures import wait
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_azmanagers import _prefect_compat as compat
from prefect_azmanagers._remote_task import ON_WORKER
from prefect_azmanagers.exceptions import (
    ConfigurationError,
    PayloadError,
    PrefectAPIUnreachable,
    WorkerLost,
)
from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

from .tasks import add, async_double, square



@pytest.fixture
def cluster(prefect_server, fake_cluster):
    return fake_cluster(forward_ports=(prefect_server.port,))


@task
def boom(x):
    raise ValueError(f"boom {x}")


def on_worker() -> bool:
    # through the module: this test module travels by value, a ContextVar cannot
    from prefect_azmanagers import _remote_task

    return _remote_task.ON_WORKER.get()


@task
def on_worker_flag():
    return on_worker()


@task
def parent(n):
    futures = square.map(range(n))
    return sum(f.result() for f in futures), type(FlowRunContext.get().task_runner).__name__


def _read_task_runs(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_results_sync_async_mapped_dependent(cluster):
    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def pipeline():
        squares = square.map(range(5))
        doubled = async_double.submit(7)
        total = add.submit(squares[1], doubled)
        waited = square.submit(3, wait_for=[total])
        return [f.result() for f in squares], doubled.result(), total.result(), waited.result()

    assert pipeline() == ([0, 1, 4, 9, 16], 14, 15, 9)
    assert len(cluster.submitted) == 8


def test_a_given_cluster_is_readied_for_the_runners_settings_without_the_servers(cluster):
    """The runner hands a cluster it is given the warm-up for its settings as it enters; the
    Prefect server's own settings (its database password) are not among them."""
    from prefect.settings import PREFECT_SERVER_DATABASE_PASSWORD, temporary_settings

    from prefect_azmanagers._remote_task import WorkerWarmUp

    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def one():
        return square.submit(3).result()

    with temporary_settings(updates={PREFECT_SERVER_DATABASE_PASSWORD: "not-for-workers"}):
        assert one() == 9
    [warm_up] = cluster.join_setups
    assert isinstance(warm_up, WorkerWarmUp)
    assert warm_up.settings["settings"]["api"]["url"]
    assert "server" not in warm_up.settings["settings"]
    assert "not-for-workers" not in repr(warm_up.settings)


def test_api_holds_task_runs_and_dependency_edges(cluster):
    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def edges():
        a = square.submit(2)
        b = square.submit(3)
        c = add.submit(a, b)
        d = square.submit(1, wait_for=[c])
        d.result()
        return FlowRunContext.get().flow_run.id, a.task_run_id, b.task_run_id, c.task_run_id, d.task_run_id

    flow_run_id, a, b, c, d = edges()
    runs = {r.id: r for r in _read_task_runs(flow_run_id)}
    assert set(runs) == {a, b, c, d}
    assert all(r.state.is_completed() for r in runs.values())
    assert {i.id for i in runs[c].task_inputs["a"]} == {a}
    assert {i.id for i in runs[c].task_inputs["b"]} == {b}
    assert {i.id for i in runs[d].task_inputs["wait_for"]} == {c}


def test_failing_task_fails_flow_with_remote_traceback(cluster):
    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def failing():
        return boom.submit(1).result()

    with pytest.raises(ValueError, match="boom 1") as info:
        failing()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback" in notes and ", in boom\nValueError: boom 1" in notes


def test_failed_upstream_leaves_downstream_not_ready(cluster):
    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def chain():
        up = boom.submit(2)
        down = square.submit(up)
        waiting = square.submit(1, wait_for=[up])
        wait([down, waiting])
        return down.state, waiting.state

    down, waiting = chain(return_state=True).result(raise_on_failure=False)
    assert down.name == "NotReady" and waiting.name == "NotReady"


def test_nested_submits_run_locally_on_the_worker(cluster):
    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def nested():
        return parent.submit(6).result(), on_worker_flag.submit().result(), on_worker()

    (total, runner_type), in_task, in_flow = nested()
    assert total == sum(i * i for i in range(6))
    assert runner_type == "AzureScaleSetTaskRunner"
    assert in_task is True and in_flow is False
    # only the top-level tasks went to the cluster; the 6 children ran on the worker
    assert len(cluster.submitted) == 2


def api_state(task_run_id):
    with get_client(sync_client=True) as client:
        return client.read_task_run(task_run_id).state


def test_lost_worker_crashes_the_task_run_with_the_reason_in_the_api(prefect_server,
                                                                     fake_cluster):
    fake = fake_cluster(forward_ports=(prefect_server.port,), lose=1)

    @flow(task_runner=AzureScaleSetTaskRunner(cluster=fake))
    def lost():
        future = square.submit(3)
        future.wait()
        state = future.state
        # recorded before the future resolved: the flow and the API agree at once
        return (future.task_run_id, state.is_crashed(), state.message,
                state.result(raise_on_failure=False), api_state(future.task_run_id))

    task_run_id, crashed, message, exception, recorded = lost()
    assert crashed and "agent died" in message
    assert isinstance(exception, WorkerLost)
    assert recorded.type == StateType.CRASHED and recorded.message == message


def test_call_cancelled_before_it_started_is_cancelled_in_the_api(prefect_server, fake_cluster):
    fake = fake_cluster(forward_ports=(prefect_server.port,), cancel=1)

    @flow(task_runner=AzureScaleSetTaskRunner(cluster=fake))
    def cancelled():
        future = square.submit(3)
        future.wait()
        return future.task_run_id, future.state

    task_run_id, state = cancelled()
    assert state.is_cancelled()
    recorded = api_state(task_run_id)
    assert recorded.type == StateType.CANCELLED and recorded.message == state.message


class RebuiltOnlyWhereMade:
    """Pickles fine; unpickles only in the process that made it (like a handle on a local
    resource). The fake engine runs calls in this process, so it refuses everywhere."""

    def __reduce__(self):
        return (_refuse_rebuild, ())


def _refuse_rebuild():
    raise OSError("the resource behind this handle exists only where it was made")


def test_argument_that_cannot_be_rebuilt_on_the_worker_fails_the_task_run(cluster):
    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def unrebuildable():
        future = add.submit(1, RebuiltOnlyWhereMade())
        future.wait()
        return future.task_run_id, future.state

    task_run_id, state = unrebuildable()
    assert state.is_failed()
    assert "Parameter 'b' of task 'add' was pickled on the driver but cannot be unpickled" \
        in state.message and "OSError: the resource behind this handle" in state.message
    with pytest.raises(PayloadError):
        state.result()
    recorded = api_state(task_run_id)
    assert recorded.type == StateType.FAILED and recorded.message == state.message


def test_unpicklable_argument_is_named_and_recorded_as_a_failed_task_run(cluster):
    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def unpicklable():
        upstream = square.submit(2)
        future = add.submit(upstream, threading.Lock(), wait_for=[upstream])
        with pytest.raises(PayloadError, match="Parameter 'b' of task 'add'"):
            future.result()
        return future.task_run_id, upstream.task_run_id, FlowRunContext.get().flow_run.id

    task_run_id, upstream_id, flow_run_id = unpicklable()
    runs = {r.id: r for r in _read_task_runs(flow_run_id)}
    assert set(runs) == {task_run_id, upstream_id}  # no engine ran it: the runner created it
    failed = runs[task_run_id]
    assert failed.state.type == StateType.FAILED and failed.name.startswith("add-")
    assert "Parameter 'b' of task 'add' cannot be pickled" in failed.state.message
    # the edges the task engine would have recorded
    assert {i.id for i in failed.task_inputs["a"]} == {upstream_id}
    assert {i.id for i in failed.task_inputs["wait_for"]} == {upstream_id}


def test_final_state_reported_by_the_worker_is_kept(prefect_server, fake_cluster):
    def once_recorded(remote):  # the worker's Completed reached the API, then it died
        deadline = time.monotonic() + 30
        while not api_state_or_none(remote.task_run_id) and time.monotonic() < deadline:
            time.sleep(0.1)

    fake = fake_cluster(forward_ports=(prefect_server.port,), lost_after=once_recorded)

    @flow(task_runner=AzureScaleSetTaskRunner(cluster=fake))
    def lost_late():
        future = square.submit(5)
        future.wait()
        return future.task_run_id, future.state

    task_run_id, state = lost_late()
    assert state.is_crashed() and "lost after the call returned" in state.message
    assert api_state(task_run_id).type == StateType.COMPLETED


def api_state_or_none(task_run_id):
    """The task run's state if it is final in the API, else None."""
    from prefect.exceptions import ObjectNotFound

    try:
        state = api_state(task_run_id)
    except ObjectNotFound:
        return None
    return state if state is not None and state.is_final() else None


def test_success_path_makes_no_extra_api_call(cluster, monkeypatch):
    from prefect_azmanagers import task_runner

    recorded = []
    monkeypatch.setattr(task_runner, "record_state", lambda *args: recorded.append(args))

    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def fine():
        return sum(square.map(range(10)).result()), boom.submit(1).wait()

    assert fine()[0] == sum(i * i for i in range(10))
    assert recorded == []  # the task's own failure (boom) is the worker's to report


def test_settings_serialized_once_across_flow_runs(cluster, monkeypatch):
    serialized = []
    monkeypatch.setattr(compat, "_serialized_settings", None)
    real = SettingsContext.serialize
    monkeypatch.setattr(SettingsContext, "serialize",
                        lambda self, *a, **k: serialized.append(self) or real(self, *a, **k))

    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def many():
        return sum(square.map(range(20)).result())

    assert many() == many() == sum(i * i for i in range(20))
    assert len(serialized) == 1


def test_worker_output_goes_to_the_flow_run_log(cluster):
    @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
    def chatty():
        square.submit(2).result()
        return FlowRunContext.get().flow_run.id

    flow_run_id = chatty()
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    lines = [log.message for log in logs if log.task_run_id is None]
    assert "From worker 1: hello from the fake worker" in lines


def test_owned_cluster_is_closed_and_cancelled_through_the_template(
    prefect_server, fake_cluster, monkeypatch
):
    made = []

    def fake_create(self, forward_port):
        made.append(fake_cluster(forward_ports=(forward_port,)))
        return made[-1]

    monkeypatch.setattr(AzureScaleSetTaskRunner, "_create_cluster", fake_create)
    monkeypatch.setattr(AzureScaleSetTaskRunner, "_manifest", lambda self: None)
    template = AzureScaleSetTaskRunner("localcloud-small", 2)
    with template.duplicate():
        assert made[0].forward_ports == (prefect_server.port,)
        template.cancel_all()  # what the flow engine calls on cancellation
        assert made[0].cancelled_all == 1
    assert made[0].closed == 1


def test_given_cluster_is_left_open_and_must_forward_the_api(prefect_server, fake_cluster):
    fake = fake_cluster(forward_ports=(prefect_server.port,))
    with AzureScaleSetTaskRunner(cluster=fake):
        pass
    assert fake.closed == 0
    with pytest.raises(PrefectAPIUnreachable, match=f"forward_ports=\\[{prefect_server.port}\\]"):
        with AzureScaleSetTaskRunner(cluster=fake_cluster(forward_ports=())):
            pass


def test_a_given_cluster_made_with_a_manifest_name_gets_that_manifests_api_address(
        prefect_server, fake_cluster):
    """A shared cluster made with manifest="name" runs its workers as the runner's own would:
    the saved manifest's API address for VMs (here: no port forward needed) applies."""
    from prefect_azmanagers.blocks import AzureManifest

    AzureManifest(subscription_id="SUB", resource_group="rg", ssh_user="u",
                  prefect_api_url_for_vms="http://10.0.0.1:4200/api").save(
        "direct-api", overwrite=True)
    fake = fake_cluster(forward_ports=())
    fake.manifest = "direct-api"
    with AzureScaleSetTaskRunner(cluster=fake):
        pass
    [warm_up] = fake.join_setups
    assert warm_up.settings["settings"]["api"]["url"] == "http://10.0.0.1:4200/api"


def test_ephemeral_mode_is_refused():
    with temporary_settings(updates={PREFECT_API_URL: None}):
        with pytest.raises(PrefectAPIUnreachable, match="PREFECT_API_URL is not set"):
            with AzureScaleSetTaskRunner("localcloud-small", 1):
                pass


def test_missing_template_or_size_is_refused():
    with pytest.raises(ConfigurationError, match="n >= 1"):
        AzureScaleSetTaskRunner("cbox", 0)


def test_runner_pickles_without_engine_and_duplicates_its_configuration(cluster):
    runner = AzureScaleSetTaskRunner("cbox08", 3, ppi=2, spot=True, env={"A": "1"})
    twin = runner.duplicate()
    assert twin == runner and twin is not runner
    copy = pickle.loads(pickle.dumps(runner))
    assert copy == runner and copy._cluster is None
    shared = AzureScaleSetTaskRunner(cluster=cluster)
    assert shared.duplicate()._given_cluster is cluster
    # re-entered on a worker (as hydrated_context does) it provisions nothing
    token = ON_WORKER.set(True)
    try:
        with pickle.loads(pickle.dumps(runner)).duplicate() as on_worker:
            assert on_worker._cluster is None and on_worker._local is not None
    finally:
        ON_WORKER.reset(token)


@pytest.mark.parametrize("options, named", [
    (dict(ppi=0), "ppi must be an integer >= 1"),
    (dict(concurrency=0), "concurrency must be an integer >= 1"),
    (dict(join_timeout=-5), "join_timeout must be a positive number"),
    (dict(heartbeat_timeout=0), "heartbeat_timeout must be a positive number"),
    (dict(mpi_ranks_per_worker=-1), "mpi_ranks_per_worker must be an integer >= 0"),
    (dict(mpi_ranks_per_worker=2, concurrency=2), "mpi_ranks_per_worker needs concurrency=1"),
    (dict(spot=True, max_price=0), "max_price must be -1"),
    (dict(max_price=0.5), "max_price applies to spot instances only"),
    (dict(spot=True, spot_regular_percentage_above_base=101), "within 0..100"),
    (dict(spot=True, spot_base_regular_priority_count=-1), ">= 0"),
    (dict(spot_base_regular_priority_count=1), "pass spot=True too"),
    (dict(env={"1BAD": "x"}), "'1BAD' is not a valid environment variable name"),
    (dict(env={"A-B": "x"}), "'A-B' is not a valid environment variable name"),
    (dict(group="has space"), "is not a scale-set name"),
    (dict(os_disk_size=0), "os_disk_size must be a size in GB"),
    (dict(max_replacements=-1), "max_replacements must be an integer >= 0"),
    (dict(max_in_flight=0), "max_in_flight must be an integer >= 1"),
    (dict(max_unrecorded=0), "max_unrecorded must be an integer >= 1"),
    (dict(api_give_up_after=0), "api_give_up_after must be a positive number"),
    (dict(warm_up="mypackage.setup"), "warm_up: 'mypackage.setup' is not MODULE:FUNCTION"),
    (dict(warm_up="m:f; rm -rf /"), "is not MODULE:FUNCTION"),
    (dict(sppot=True), "unknown cluster option(s) sppot; the options are: adapt, api_give_up_after, concurrency"),
])
def test_bad_options_fail_at_construction_naming_the_option(options, named):
    """Nothing is provisioned first: the runner and the cluster refuse the option when made."""
    from prefect_azmanagers.cluster.cluster import AzureCluster

    for make in (lambda: AzureScaleSetTaskRunner("t", 1, **options),
                 lambda: AzureCluster("t", 1, **options)):
        with pytest.raises(ConfigurationError) as refused:
            make()
        assert named in str(refused.value)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_a_bad_instance_count_fails_at_construction(n):
    with pytest.raises(ConfigurationError, match="n"):
        AzureScaleSetTaskRunner("t", n)


def test_a_manifest_object_never_travels_to_workers_with_the_runner():
    """The runner is pickled into every task's context: its manifest's secrets stay home."""
    from prefect_azmanagers.blocks import AzureManifest

    secret = "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-material-1234\n"
    manifest = AzureManifest(subscription_id="SUB", resource_group="rg", ssh_user="u",
                             ssh_private_key=secret, client_secret="client-secret-5678")
    blob = pickle.dumps(AzureScaleSetTaskRunner("t", 1, manifest=manifest))
    assert b"secret-material-1234" not in blob and b"client-secret-5678" not in blob
    twin = pickle.loads(blob)
    assert twin.manifest is None   # an unsaved manifest: refused clearly if used elsewhere
    with pytest.raises(ConfigurationError, match="unsaved AzureManifest"):
        twin._create_cluster(None)
    assert pickle.loads(pickle.dumps(AzureScaleSetTaskRunner("t", 1, manifest="prod"))).manifest == "prod"


def test_the_flow_engines_duplicate_keeps_the_manifest_object():
    """Prefect duplicates the runner at every flow start, in process: an unsaved manifest (or a
    changed copy of a saved one) is what the flow runs with, not None or the saved block."""
    from prefect_azmanagers.blocks import AzureManifest

    manifest = AzureManifest(subscription_id="SUB", resource_group="rg", ssh_user="u")
    assert AzureScaleSetTaskRunner("t", 1, manifest=manifest).duplicate().manifest is manifest
