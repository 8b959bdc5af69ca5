"""AzureScaleSetTaskRunner: run a flow's tasks on the instances of an Azure scale set.

The runner is a thin Prefect adapter over `AzureCluster` (the engine in `cluster/`), as
prefect-dask's `DaskTaskRunner` is over a Dask client. Switching a flow over is one line:

```python
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

@task
def square(x):
    return x * x

@flow(task_runner=ThreadPoolTaskRunner())                    # before: threads on this machine
def sweep():
    return sum(square.map(range(100)).result())
```

```python
from prefect_azmanagers import AzureScaleSetTaskRunner

@flow(task_runner=AzureScaleSetTaskRunner("cbox08", 5))     # after: 5 scale-set instances
def sweep():
    return sum(square.map(range(100)).result())
```

`submit` returns a future at once; the task starts on the first free worker slot (elastic:
work begins as soon as the first instance joins; `waitfor=True` blocks until all have).
Each task run executes Prefect's own task engine on the worker, which reports its states and
logs to the driver's Prefect API through the SSH connection, so the UI shows every task run,
its logs and its dependency edges as with a local runner. When the engine rather than the
task ends a task run (its worker kept being lost, an argument cannot be sent or rebuilt, the
call was cancelled), no worker reports that outcome: the runner writes the task run's
Crashed, Failed or Cancelled state to the API itself, so the UI shows why. The cluster is
created when the flow starts and torn down when it ends; pass `cluster=` to share one
`AzureCluster` between flows instead.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import sys
import threading
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prefect.client.schemas.objects import RunInput
from prefect.context import FlowRunContext
from prefect.futures import PrefectConcurrentFuture, PrefectFuture, wait
from prefect.logging import get_run_logger
from prefect.settings import get_current_settings
from prefect.states import Cancelled, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.engine import collect_task_run_inputs_sync
from typing_extensions import Self

from prefect_azmanagers import _prefect_compat as compat
from prefect_azmanagers._log_relay import MembershipLogRelay
from prefect_azmanagers._recording import RecordingWatch
from prefect_azmanagers._remote_task import (
    ON_WORKER,
    RemoteTaskRun,
    RunNotStarted,
    WorkerWarmUp,
)
from prefect_azmanagers._task_states import (
    ReportedStates,
    Submission,
    futures_to_states,
    record_state,
    settle,
    state_for_error,
)
from prefect_azmanagers.cluster import serialization
from prefect_azmanagers.exceptions import (
    ConfigurationError,
    PayloadError,
    PrefectAPIUnreachable,
)
from prefect_azmanagers.network import is_loopback
from prefect_azmanagers.storage import result_storage

if TYPE_CHECKING:
    from prefect.tasks import Task

    from prefect_azmanagers.blocks import AzureManifest, ScaleSetTemplate
    from prefect_azmanagers.cluster.cluster import AzureCluster

_RESOLVER_THREADS = 64
_RECORDER_THREADS = 4


class AzureScaleSetTaskRunner(TaskRunner[PrefectConcurrentFuture[Any]]):
    """Runs task runs on scale-set instances over SSH (AzManagers' `addprocs(template, n)`).

    Args:
        template: a `ScaleSetTemplate` block or the name of a saved one.
        n: number of instances; each runs `ppi` worker slots.
        manifest: an `AzureManifest` block or the name of a saved one.
        waitfor: block at flow start until all `n * ppi` workers joined (or `join_timeout`).
        cluster: an `AzureCluster` to run on instead of creating one; the runner leaves it
            running when the flow ends. The other arguments are then ignored.
        **options: every `ClusterOptions` keyword (`cluster/options.py`), checked here:
            ppi, group, spot and its priority mix, max_price, customenv (True captures this
            machine's Python environment at flow start; an `EnvironmentSpec` reuses one
            capture), mpi_ranks_per_worker, mpi_flags, env, os_disk_size, image_name,
            image_version, join_timeout, max_task_retries_on_lost_worker,
            replace_lost_workers, max_replacements, concurrency, heartbeat_timeout, progress,
            adapt, spot_fallback, max_in_flight (task runs in flight at most; default 256),
            api_give_up_after (seconds of a failing Prefect API before the flow's task runs
            fail; the runner probes its API's /health and slows dispatch on 429/503),
            max_unrecorded (task runs sent and not recorded by the API yet, at most; default
            512: a server that falls behind is waited for instead of dropping events).
    """

    def __init__(
        self,
        template: str | ScaleSetTemplate | None = None,
        n: int = 0,
        *,
        manifest: str | AzureManifest = "default",
        cluster: AzureCluster | None = None,
        **options: Any,
    ):
        adaptive = options.get("adapt") is not None
        if cluster is None and (template is None or isinstance(n, bool) or not isinstance(n, int)
                                or n < (0 if adaptive else 1)):
            raise ConfigurationError(
                "AzureScaleSetTaskRunner needs a scale-set template and a number of instances "
                f"n >= 1 (got template={template!r}, n={n!r}), e.g. "
                "AzureScaleSetTaskRunner('cbox08', 4), or an existing cluster: "
                "AzureScaleSetTaskRunner(cluster=my_cluster)."
            )
        from prefect_azmanagers.cluster.options import ClusterOptions, check_instance_count

        self.template = template
        self.n = n
        self.manifest = manifest
        # Checked now, at construction: a bad option fails before anything is provisioned.
        self.options = ClusterOptions.from_keywords(options)
        if adaptive:
            check_instance_count(n or None, self.options.adapt)
        self._given_cluster = cluster
        self._reset_runtime_state()
        super().__init__()

    def _reset_runtime_state(self) -> None:
        self._cluster: AzureCluster | None = None
        self._local: ThreadPoolTaskRunner | None = None
        self._resolver: concurrent.futures.ThreadPoolExecutor | None = None
        self._recorder: concurrent.futures.ThreadPoolExecutor | None = None
        self._flow_run_id: uuid.UUID | None = None
        self._flow_settings: Any = None
        self._lock = threading.Lock()
        self._outstanding: set[concurrent.futures.Future[Any]] = set()
        self._engine_futures: set[concurrent.futures.Future[Any]] = set()
        self._duplicates: list[AzureScaleSetTaskRunner] = []
        self._shared: tuple[Any, Any, bytes] | None = None
        self._task_blobs: dict[int, tuple[Any, bytes]] = {}
        self._api_url_for_workers: str | None = None
        self._result_storage: str | None = None  # the manifest's blob container, as a block slug
        self._flow_logger: Any = None
        self._flow_context = contextvars.Context()
        self._previous_output_handler: Any = None
        self._membership_log: MembershipLogRelay | None = None
        self._recording: RecordingWatch | None = None
        self._calls_back = 0  # engine calls that came back (their task runs were reported)
        self._reported = ReportedStates()  # their final states, should their events be lost

    def duplicate(self) -> Self:
        """A fresh runner with this configuration (sharing a passed-in cluster)."""
        # Not through the constructor: a runner unpickled on a worker (no template, no
        # cluster: they do not travel) is duplicated by Prefect's engine there too, and the
        # constructor rightly refuses that configuration from a user.
        twin = object.__new__(type(self))
        twin.__setstate__(self.__getstate__())
        # In-process copies keep what pickling reduces: the cluster and the manifest object
        # itself (an unsaved or locally changed one is what the flow asked for).
        twin._given_cluster, twin.manifest = self._given_cluster, self.manifest
        with self._lock:
            self._duplicates = [d for d in self._duplicates if d._started]
            self._duplicates.append(twin)
        return twin

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, AzureScaleSetTaskRunner)
            and (self.template, self.n, self.manifest, self.options, self._given_cluster)
            == (other.template, other.n, other.manifest, other.options, other._given_cluster)
        )

    def __getstate__(self) -> dict[str, Any]:
        # The runner travels inside every task's context; engines, pools and locks stay home.
        state = {k: v for k, v in self.__dict__.items() if k in _CONFIGURATION}
        # A manifest object holds secrets (keys, client secret) that workers never need:
        # only the name of a saved one travels.
        state.update(_given_cluster=None, _started=False, manifest=_manifest_name(self.manifest))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime_state()

    @property
    def cluster(self) -> AzureCluster | None:
        """The cluster this runner submits to while it runs on the driver (else None)."""
        return self._cluster

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        super().__enter__()
        if ON_WORKER.get():
            # Re-entered on a worker by `hydrated_context`: nested submits run there, in an
            # unbounded thread pool so a parent waiting on its children never deadlocks.
            self._local = ThreadPoolTaskRunner(max_workers=sys.maxsize).__enter__()
            return self
        try:
            self._membership_log = MembershipLogRelay.install()  # before waitfor's joins
            forward_port = self._plan_api_access()
            self._cluster = self._given_cluster or self._create_cluster(forward_port)
            if self._given_cluster is not None:
                if forward_port is not None:
                    _require_forwarded(self._given_cluster, forward_port)
                # Its slots get ready for this runner's settings before its first task.
                self._given_cluster.on_join(WorkerWarmUp(self._worker_settings()))
            self._previous_output_handler = self._cluster.output_handler
            self._cluster.output_handler = self._log_worker_output
            self._resolver = concurrent.futures.ThreadPoolExecutor(
                _RESOLVER_THREADS, thread_name_prefix="azm-resolver"
            )
            # Its own pool: resolver threads may all be waiting for the upstream task runs
            # whose states it records. No thread starts unless a task run needs it.
            self._recorder = concurrent.futures.ThreadPoolExecutor(
                _RECORDER_THREADS, thread_name_prefix="azm-state-recorder"
            )
        except BaseException:
            self._close(cancel=True)
            raise
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        try:
            self._close(cancel=exc_type is not None)
        finally:
            super().__exit__(exc_type, exc_value, traceback)

    def _close(self, *, cancel: bool) -> None:
        """Finish (or, after an error, cancel) this runner's work, then stop what it made."""
        try:
            self._close_work(cancel=cancel)
        finally:
            if self._membership_log is not None:
                self._membership_log.uninstall()
                self._membership_log = None

    def _close_work(self, *, cancel: bool) -> None:
        if self._local is not None:
            self._local.__exit__(None, None, None)
            self._local = None
        if cancel:
            self.cancel_all()
        else:
            concurrent.futures.wait(list(self._outstanding))
        if self._resolver is not None:
            self._resolver.shutdown(wait=True, cancel_futures=True)
            self._resolver = None
        if self._recorder is not None:
            self._recorder.shutdown(wait=True, cancel_futures=True)
            self._recorder = None
        if self._recording is not None:
            if not cancel:  # the workers stay up while the API records their last task runs
                self._recording.settle(repair=self._reported)
            self._recording.stop()
            self._recording = None
            self._reported = ReportedStates()
        cluster, self._cluster = self._cluster, None
        if cluster is None:
            return
        if cluster is self._given_cluster:
            cluster.output_handler = self._previous_output_handler
        else:
            try:
                cluster.close()
            finally:
                self._report_usage(cluster)

    def _report_usage(self, cluster: AzureCluster) -> None:
        """At flow end: what the flow's cluster used, as a log line and a markdown artifact."""
        report = cluster.usage()
        logger = self._flow_logger or logging.getLogger("prefect_azmanagers.task_runner")
        logger.info("Cluster %s %s", cluster.group, report.line())
        if self._flow_run_id is None:
            return
        from prefect.artifacts import create_markdown_artifact

        try:
            self._flow_context.run(
                create_markdown_artifact, markdown=report.markdown(f"Cluster {cluster.group}"),
                key="azmanagers-usage", description="Instances, instance-hours by priority, "
                "evictions, re-queued calls and workers of the flow's scale-set cluster")
        except Exception as exc:  # the flow's outcome does not hang on a report
            logger.warning("could not write the usage artifact: %s", exc)

    def cancel_all(self) -> None:
        """Stop this runner's remote work (Prefect calls it when the flow run is cancelled).

        Called on the flow's template runner, it reaches the duplicates the flow entered.
        """
        with self._lock:
            duplicates = list(self._duplicates)
            engine_futures = list(self._engine_futures)
            outstanding = list(self._outstanding)
        for duplicate in duplicates:
            duplicate.cancel_all()
        if self._cluster is not None:
            if self._cluster is self._given_cluster:
                for future in engine_futures:
                    self._cluster.cancel(future)
            else:
                self._cluster.cancel_all()
        for future in outstanding:
            if not future.done():
                settle(future, Cancelled(message="Cancelled with the flow run."))

    def _create_cluster(self, forward_port: int | None) -> AzureCluster:
        from prefect_azmanagers.cluster.cluster import AzureCluster

        if self.template is None:
            raise ConfigurationError(
                "This AzureScaleSetTaskRunner was built around an existing cluster, which does "
                "not travel with a pickled flow; give it a template and n to run elsewhere."
            )
        if self.manifest is None:
            raise ConfigurationError(
                "This AzureScaleSetTaskRunner was given an unsaved AzureManifest object, which "
                "does not travel with a pickled flow (it holds secrets): save it "
                "(`manifest.save('name')`) and pass its name, manifest='name'."
            )
        cluster = AzureCluster(
            self.template, self.n or None, manifest=self.manifest,
            **dict(vars(self.options), forward_ports=() if forward_port is None else (forward_port,),
                   prefect_api=self.options.prefect_api or get_current_settings().api.url),
        )
        # Each slot gets ready as it joins, so the first task pays nothing extra (issue 12).
        cluster.on_join(WorkerWarmUp(self._worker_settings()))
        self._cluster = cluster
        return cluster.start()

    def _plan_api_access(self) -> int | None:
        """How workers reach the Prefect API; returns the driver port to forward, if any."""
        api_url = get_current_settings().api.url
        if not api_url:
            raise PrefectAPIUnreachable(
                "AzureScaleSetTaskRunner needs a Prefect API that the workers can report to, but "
                "PREFECT_API_URL is not set (Prefect's ephemeral mode). Start a server "
                "(`prefect server start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api, "
                "or use Prefect Cloud."
            )
        manifest = self._manifest()
        self._result_storage = result_storage(manifest)
        for_vms = getattr(manifest, "prefect_api_url_for_vms", None)
        if for_vms and for_vms != api_url:
            self._api_url_for_workers = for_vms
            return None
        parts = urlsplit(api_url)
        if is_loopback(api_url):
            return parts.port or (443 if parts.scheme == "https" else 80)
        return None  # a routable URL (e.g. Prefect Cloud): workers reach it directly

    def _manifest(self) -> AzureManifest | None:
        """The manifest the workers were made with: the runner's, or the given cluster's
        (loaded when the cluster names it, so its blob container and API address for VMs
        apply to a shared cluster as they do to the runner's own)."""
        from prefect_azmanagers.blocks import load_manifest

        if self._given_cluster is None:
            return load_manifest(self.manifest)
        manifest = getattr(self._given_cluster, "manifest", None)
        return load_manifest(manifest) if isinstance(manifest, str) else manifest

    # -- submission --------------------------------------------------------------------

    def submit(
        self,
        task: Task[Any, Any],
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
        dependencies: dict[str, set[RunInput]] | None = None,
    ) -> PrefectConcurrentFuture[Any]:
        """Send one task run to the cluster; returns its future at once."""
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        if self._local is not None:
            return self._local.submit(task, parameters, wait_for, dependencies)

        if self._flow_logger is None and (flow_run_context := FlowRunContext.get()):
            self._flow_logger = get_run_logger(flow_run_context)
            self._flow_context = contextvars.copy_context()
            self._flow_run_id = getattr(flow_run_context.flow_run, "id", None)
            self._flow_settings = compat.current_settings_context()
            if self._membership_log is not None:
                self._membership_log.attach(self._flow_logger, self._flow_context)
            if self._flow_run_id is not None and self._cluster.options.max_unrecorded:
                self._recording = RecordingWatch(
                    self._cluster, self._flow_run_id, self._flow_settings,
                    lambda: self._calls_back, self._flow_logger).start()
        upstream = {k: collect_task_run_inputs_sync(v) for k, v in parameters.items()}
        merged = {k: set(v) for k, v in upstream.items()}
        for key, inputs in (dependencies or {}).items():
            merged[key] = merged.get(key, set()) | set(inputs)
        run = Submission(
            outer=concurrent.futures.Future(), task=task, task_run_id=compat.new_task_run_id(),
            parameters=parameters, wait_for=list(wait_for) if wait_for else None,
            dependencies=merged, context=compat.task_scoped_context(),
            shared=self._flow_run_payload(),
        )
        with self._lock:
            self._outstanding.add(run.outer)
        run.outer.add_done_callback(self._forget)
        if run.wait_for or any(upstream.values()):
            assert self._resolver is not None
            self._resolver.submit(self._dispatch, run)
        else:
            self._dispatch(run)
        return PrefectConcurrentFuture(task_run_id=run.task_run_id, wrapped_future=run.outer)

    def _dispatch(self, run: Submission) -> None:
        """Wait for upstream futures, then hand the task run to the engine."""
        try:
            wait_for_states = None
            if run.wait_for:
                wait(run.wait_for)
                wait_for_states = [f.state for f in run.wait_for]
            # Futures do not pickle; their final States do, and the remote engine resolves
            # them as it would futures (a failed upstream gives Pending("NotReady")).
            parameters = futures_to_states(run.parameters)
            remote = RemoteTaskRun(
                self._pickled_task(run.task), run.task.name, run.task_run_id, parameters,
                wait_for_states, run.dependencies, run.context, run.shared,
            )
            if run.outer.done():  # cancelled while waiting for upstream work
                return
            assert self._cluster is not None
            engine_future = self._cluster.submit(remote, label=f"{run.task.name} {run.task_run_id}")
        except BaseException as exc:
            self._end_here(run, state_for_error(exc))
            return
        with self._lock:
            self._engine_futures.add(engine_future)
        engine_future.add_done_callback(lambda done: self._on_engine_done(done, run))

    def _on_engine_done(self, done: concurrent.futures.Future[Any], run: Submission) -> None:
        # On the cluster's event loop thread: keep it quick (API writes go to the recorder).
        with self._lock:
            self._engine_futures.discard(done)
            self._calls_back += 1
        if done.cancelled():
            self._end_here(run, Cancelled(message="Cancelled with the flow run."))
        elif (exc := done.exception()) is None:
            if self._recording is not None:  # the watch's settle may need it at the end
                self._reported.note(run.task_run_id, done.result(), run.task)
            settle(run.outer, done.result())
        elif isinstance(exc, PrefectAPIUnreachable):  # nothing can be recorded there
            settle(run.outer, state_for_error(exc))
        elif isinstance(exc, PayloadError) and not isinstance(exc, RunNotStarted):
            # The call returned, but its State cannot travel back: the worker's engine
            # already reported the task run's final state, which stays as it is.
            settle(run.outer, state_for_error(exc))
        else:
            self._end_here(run, state_for_error(exc))

    def _end_here(self, run: Submission, state: State) -> None:
        """End a task run with a state built here (no worker reported it): record the state
        in the Prefect API first, then settle the future, so both agree when it resolves."""
        if run.outer.done():
            return  # already ended (cancelled with the flow run)
        recorder = self._recorder
        try:
            if recorder is None:
                raise RuntimeError("the runner is closing")
            recorder.submit(self._record_and_settle, run, state)
        except RuntimeError:  # closing: the state is not recorded, the flow still gets it
            settle(run.outer, state)

    def _record_and_settle(self, run: Submission, state: State) -> None:
        try:
            if not run.outer.done():
                record_state(run, state, self._flow_run_id, self._flow_settings)
        except Exception as exc:  # noqa: BLE001 - the flow still gets the state
            self.logger.warning(
                "Could not record task run %s (%s) as %s in the Prefect API: %s: %s",
                run.task_run_id, run.task.name, state.name, type(exc).__name__, exc,
            )
        finally:
            settle(run.outer, state)

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._outstanding.discard(future)

    def _flow_run_payload(self) -> bytes:
        """The pickled context parts fixed for the flow run (settings, flow run, flow).

        Serializing and pickling them is most of a submit's cost, and they do not change
        between the submits of one flow run: they are pickled once (per settings and flow
        run) and sent as bytes with every task; workers unpickle each distinct blob once.
        """
        settings_source = compat.current_settings_context()
        engine_context = compat.current_engine_context()
        cached = self._shared
        if cached is None or cached[0] is not settings_source or cached[1] is not engine_context:
            shared = compat.flow_run_scoped_context(self._worker_settings())
            if self._result_storage:
                _leave_result_storage_to_workers(shared)
            cached = self._shared = (settings_source, engine_context,
                                     serialization.dumps(shared, what="the flow run's context"))
        return cached[2]

    def _worker_settings(self) -> dict[str, Any]:
        """The driver's serialized settings as workers get them: their API URL, the
        manifest's blob container as their default result storage (Prefect's own setting),
        and none of the server's own settings (its database URL and password among them:
        Prefect would ship them to remote workers too; a worker runs no server)."""
        settings = compat.serialize_settings()
        if not settings:
            return {}
        sections = {name: value for name, value in settings.get("settings", {}).items()
                    if name != "server"}
        if self._api_url_for_workers:
            sections["api"] = dict(sections.get("api", {}), url=self._api_url_for_workers)
        if self._result_storage:
            sections["results"] = dict(sections.get("results", {}),
                                       default_storage_block=self._result_storage)
        profile = settings.get("profile")
        if isinstance(profile, dict) and isinstance(profile.get("settings"), dict):
            profile = dict(profile, settings={
                name: value for name, value in profile["settings"].items()
                if not str(name).startswith("PREFECT_SERVER_")})
        return dict(settings, settings=sections, profile=profile)

    def _pickled_task(self, task: Task[Any, Any]) -> bytes:
        """The task pickled once per runner (by value when its module is not installed)."""
        with self._lock:
            entry = self._task_blobs.get(id(task))
        if entry is None or entry[0] is not task:
            entry = (task, serialization.dumps(task, what=f"task {task.name!r}"))
            with self._lock:
                self._task_blobs[id(task)] = entry
        return entry[1]

    # -- worker output -----------------------------------------------------------------

    def _log_worker_output(self, worker: Any, stream: str, line: str) -> None:
        """Show a worker's stdout/stderr line in the flow run's log (and so in the UI)."""
        if self._flow_logger is None:
            self.logger.info("From worker %s: %s", getattr(worker, "id", worker), line)
            return
        # Run in the flow's context: its settings say where the API (and so the log) is.
        self._flow_context.copy().run(
            self._flow_logger.info, "From worker %s: %s", getattr(worker, "id", worker), line
        )


_CONFIGURATION = ("template", "n", "manifest", "options", "_given_cluster", "logger", "_started")


def _leave_result_storage_to_workers(shared: dict[str, Any]) -> None:
    """Drop the driver's default result storage from the flow run context workers get, so their
    task runs fall back to the default result storage of their settings (the blob container).

    The driver's flow run resolved its default (a LocalFileSystem on the driver's disk) before
    the runner started; a storage the flow sets itself (`@flow(result_storage=...)`) stays.
    """
    flow_run = shared.get("flow_run_context") or {}
    flow = flow_run.get("flow")
    if getattr(flow, "result_storage", None) is None and "result_store" in flow_run:
        flow_run["result_store"] = {
            k: v for k, v in flow_run["result_store"].items() if k != "result_storage"}


def _manifest_name(manifest: str | AzureManifest | None) -> str | None:
    """The name a manifest travels as: its own, or a saved block's; None for an unsaved one."""
    if manifest is None or isinstance(manifest, str):
        return manifest
    return getattr(manifest, "_block_document_name", None)


def _require_forwarded(cluster: AzureCluster, port: int) -> None:
    if port not in tuple(getattr(cluster, "forward_ports", ())):
        raise PrefectAPIUnreachable(
            f"The Prefect API is on the driver's loopback (port {port}) but the cluster passed "
            f"to AzureScaleSetTaskRunner does not forward it to its workers. Create it with "
            f"AzureCluster(..., forward_ports=[{port}])."
        )
