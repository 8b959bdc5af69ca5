"""The picklable callable that runs one Prefect task run on a worker and returns its final State.

The driver builds a `RemoteTaskRun` per submitted task and hands it to the engine, which
cloudpickles it to an agent. On the worker it enters the flow's serialized context (the
driver's settings, so the remote engine reports to the driver's Prefect API through the SSH
tunnel), runs Prefect's task engine with `return_type="state"`, waits until the task's events
have left the process, and returns the State. A task's own exception stays inside the Failed
State, with the worker's traceback added as a note so the driver (and the flow's log) show
where it was raised. What cannot be rebuilt on the worker (an argument, the task, the flow
run's context) raises `RunNotStarted` before the engine starts: the task run then has no
state in the API, and the driver records one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import hashlib
import logging
import socket
import threading
import traceback
import uuid
from typing import Any, Callable, Iterator

import cloudpickle

from prefect_azmanagers.cluster import serialization
from prefect_azmanagers.cluster.mpi.ranks import RankedCall, RankZero
from prefect_azmanagers.exceptions import RunNotStarted

ON_WORKER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "prefect_azmanagers_on_worker", default=False
)
"""True while a task run executes on a worker: the flow's task runner, re-entered there by
`hydrated_context`, then runs nested submits locally instead of provisioning a cluster."""


class RemoteTaskRun(RankedCall):
    """One task run, shipped to a worker: `RemoteTaskRun(...)()` returns the final State."""

    def __init__(
        self,
        task: bytes,
        task_name: str,
        task_run_id: uuid.UUID,
        parameters: dict[str, Any],
        wait_for: list[Any] | None,
        dependencies: dict[str, set[Any]],
        task_context: dict[str, Any],
        flow_run_context: bytes,
    ) -> None:
        # Everything that may fail to unpickle on the worker arrives pickled, so the worker
        # can say which part failed (`RunNotStarted`). `task` and `flow_run_context` are
        # pickled once per flow run and unpickled once per distinct blob (`_loads_once`).
        # Each parameter is pickled here, on its own, unless it is of a builtin data type
        # (which unpickles anywhere): a large bytes or str argument is not copied twice.
        self._task = task
        self.task_name = task_name
        self.task_run_id = task_run_id
        self._parameter_names = tuple(parameters)
        self._plain_parameters = {
            name: value for name, value in parameters.items() if type(value) in _PLAIN_DATA
        }
        self._pickled_parameters = {  # payloads: their large buffers are not copied again
            name: serialization.dumps_payload(
                value, what=f"Parameter {name!r} of task {task_name!r}")
            for name, value in parameters.items() if name not in self._plain_parameters
        }
        self.wait_for = wait_for
        self.dependencies = dependencies
        self._task_context = task_context
        self._flow_run_context = flow_run_context

    @property
    def task(self) -> Any:
        return _rebuild(lambda: _loads_once(self._task), f"Task {self.task_name!r}")

    @property
    def context(self) -> dict[str, Any]:
        """The whole serialized context, as `prefect.context.serialize_context()` makes it."""
        flow_run = _rebuild(lambda: _loads_once(self._flow_run_context),
                            f"The flow run's context for task {self.task_name!r}")
        return {**flow_run, **self._task_context}

    @property
    def parameters(self) -> dict[str, Any]:
        return {name: self._parameter(name) for name in self._parameter_names}

    def _parameter(self, name: str) -> Any:
        if name in self._plain_parameters:
            return self._plain_parameters[name]
        return _rebuild(lambda: serialization.loads(self._pickled_parameters[name]),
                        f"Parameter {name!r} of task {self.task_name!r}")

    @contextlib.contextmanager
    def _in_flow_run(self, context: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Any]]:
        """On the worker: the driver's settings and flow run context (`self.context`),
        hydrated with this thread's client, and ON_WORKER set; yields (serialized settings,
        client)."""
        from prefect.context import hydrated_context

        _drain_at_agent_exit()  # task-run logs and events reach the API before the agent exits
        settings = context.pop("settings_context")
        token = ON_WORKER.set(True)  # the flow's task runner, re-entered here, runs locally
        try:
            with _settings_context(settings):
                client = _thread_client()
                with hydrated_context(context, client=client):
                    _keep_api_records_off_stderr()
                    yield settings, client
        finally:
            ON_WORKER.reset(token)

    def lead(self, ranks: RankZero | None) -> Any:
        """Run the task run with Prefect's engine; under MPI (`ranks`), each attempt of its
        body also runs on the other ranks."""
        import httpx
        from prefect.task_engine import run_task_async, run_task_sync

        from prefect_azmanagers.mpi import checking_other_ranks

        context, task, parameters = self.context, self.task, self.parameters
        with self._in_flow_run(context) as (settings, _):
            kwargs = dict(
                task=checking_other_ranks(task, ranks),  # MPI: every rank runs each attempt
                task_run_id=self.task_run_id,
                parameters=parameters,
                wait_for=self.wait_for,
                return_type="state",
                dependencies=self.dependencies,
            )
            try:
                if task.isasync:
                    state = asyncio.run(run_task_async(**kwargs))
                else:
                    state = run_task_sync(**kwargs)
                flush_events()  # inside the context: its settings name the API
            except (OSError, httpx.TransportError) as exc:
                raise _api_unreachable(settings, exc) from exc
            state = _result_by_reference(state, task)
        _note_remote_traceback(state)
        return state

    def follow(self, attempt: dict[str, Any]) -> None:
        """On ranks > 0 of an MPI worker, once per attempt rank 0's engine makes: the bare task
        function in that attempt's task run context (`attempt`, from
        `prefect_azmanagers.mpi.checking_other_ranks`); rank 0 runs Prefect's engine, so the
        task run's states are reported once."""
        from prefect_azmanagers.mpi import run_task_function

        with self._in_flow_run(self.context) as (_, client):
            run_task_function(self.task, self.parameters, attempt, client)


def warm_up() -> None:
    """Make this worker process ready for its first task run (a cluster's default `warm_up`,
    `cluster.options.PREFECT_WARM_UP`, run by each agent before the slot says HELLO;
    `WorkerWarmUp` calls it too, for a cluster made with another one): import Prefect's task
    engine and what a task run uses (2-4 s of a fresh process on this project's 2-core
    machine, which the first task run paid otherwise, several slots at once), load the
    installed Prefect collections (the first block a flow run context builds, its result
    storage, loads them all: prefect-dask alone takes ~0.8 s) and build the context models
    that `hydrated_context` rebuilds on first use. Nothing here depends on the driver's
    settings, which arrive with the first task."""
    import httpx  # noqa: F401
    import prefect.events.worker  # noqa: F401
    import prefect.logging.handlers  # noqa: F401
    import prefect.task_engine  # noqa: F401
    from prefect.context import hydrated_context
    from prefect.plugins import load_prefect_collections

    import prefect_azmanagers.mpi  # noqa: F401
    import prefect_azmanagers.task_runner  # noqa: F401  (the flow's runner, in each context)

    load_prefect_collections()
    with hydrated_context():  # its model_rebuild() calls; an empty context enters nothing
        pass


class WorkerWarmUp:
    """Run once on each slot as it joins, before its first task (the cluster sends it): what
    the first task run would otherwise pay under the driver's settings, ~1-2 s here with
    four slots joining at once (and `warm_up()`'s imports, on a cluster given to the runner
    that was made with another `warm_up`). The settings are hydrated (and cached for every
    task run that brings the same ones), Prefect's logging is set up under them, this thread's API
    client is opened (it checks the server's API version), the default result storage block
    (the manifest's blob container) is loaded, and the slot's first event,
    `prefect-azmanagers.worker.ready`, is sent (the events worker's connection opened and
    its first emit paid: ~0.6 s here).

    `settings` is `_prefect_compat.serialize_settings()` as the workers get it (the task
    runner's, with the API URL the workers use)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def __call__(self) -> None:
        import os

        from prefect.events import emit_event
        from prefect.logging.configuration import ensure_logging_setup

        warm_up()  # done already where the cluster's agents ran it before joining
        _drain_at_agent_exit()
        with _settings_context(self.settings):
            ensure_logging_setup()
            _keep_api_records_off_stderr()
            _thread_client()
            _default_result_storage()
            host = socket.gethostname()
            emit_event("prefect-azmanagers.worker.ready", resource={
                "prefect.resource.id": f"prefect-azmanagers.worker.{host}.{os.getpid()}",
                "prefect.resource.name": f"{host} pid {os.getpid()}",
            })
            flush_events()


_PLAIN_DATA = frozenset({bytes, bytearray, str, int, float, complex, bool, type(None)})


def _rebuild(load: Callable[[], Any], what: str) -> Any:
    """`load()`, or RunNotStarted saying that `what` cannot be unpickled on this worker."""
    try:
        return load()
    except Exception as exc:
        raise RunNotStarted(
            f"{what} was pickled on the driver but cannot be unpickled on the worker "
            f"{socket.gethostname()}: {type(exc).__name__}: {exc}. Values must rebuild outside "
            "the driver's process: their modules importable on the instances (installed, or "
            "customenv=True) and nothing tied to the driver (open files, locks, sockets, "
            "process ids); create such resources inside the task instead."
        ) from exc


_unpickled: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
_unpickled_lock = threading.Lock()
_UNPICKLED_KEPT = 32


def _loads_once(blob: bytes) -> Any:
    """Unpickle `blob`, or return what an identical blob unpickled to before (tasks and flow
    run contexts repeat across a flow's task runs; rebuilding them is the costly part)."""
    key = hashlib.blake2b(blob, digest_size=16).digest()
    with _unpickled_lock:
        if key in _unpickled:
            _unpickled.move_to_end(key)
            return _unpickled[key]
    value = cloudpickle.loads(blob)
    with _unpickled_lock:
        _unpickled[key] = value
        while len(_unpickled) > _UNPICKLED_KEPT:
            _unpickled.popitem(last=False)
    return value


_settings_lock = threading.Lock()
_settings_cache: tuple[dict[str, Any], Any, Any] | None = None


def _settings_context(serialized: dict[str, Any]) -> Any:
    """The driver's settings as a SettingsContext, built once per distinct settings.

    Building Prefect's Settings from the serialized dict costs ~0.5 s (pydantic-settings
    re-reads every source); the driver sends the same settings with every task of a flow.
    """
    global _settings_cache
    from prefect.context import SettingsContext

    with _settings_lock:
        if _settings_cache is None or (_settings_cache[0] is not serialized
                                       and _settings_cache[0] != serialized):
            built = SettingsContext(**serialized)
            _settings_cache = (serialized, built.profile, built.settings)
        _, profile, settings = _settings_cache
    return SettingsContext(profile=profile, settings=settings)


def _thread_client() -> Any:
    """This worker thread's Prefect API client, kept open across its task runs.

    Prefect makes a new client (and TLS context, ~0.1 s) per task run otherwise. The client
    context stays entered in the thread (the agent's pool threads live as long as the agent)
    so the task engine's own `SyncClientContext.get_or_create()` finds it too.
    """
    from prefect.context import SyncClientContext
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    current = SyncClientContext.get()
    if current is None or str(current.client.api_url).rstrip("/") != str(api_url).rstrip("/"):
        current = SyncClientContext()
        current.__enter__()  # left open on purpose: one client per agent thread
    return current.client


def _default_result_storage() -> None:
    """Load the result storage block the settings name (the manifest's blob container), if
    any: Prefect keeps it per process and settings, so the first task run does not wait for
    the block's read from the API before it can persist its result."""
    from prefect.results import get_default_result_storage
    from prefect.settings import get_current_settings

    if get_current_settings().results.default_storage_block:
        get_default_result_storage()


def flush_events() -> None:
    """Wait until this process's Prefect events (task-run states) have been sent to the API.

    Task-run state changes reach the server as events; returning the final State before they
    are sent would let the driver see a result the API does not hold yet. Logs are batched by
    Prefect every 2 s and drained when the agent stops (`drain_prefect_services`).
    """
    from prefect.events.worker import EventsWorker

    EventsWorker.instance().wait_until_empty()


def drain_prefect_services() -> None:
    """Send every queued Prefect log and event and stop their workers (agent shutdown)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


def _drain_at_agent_exit() -> None:
    from prefect_azmanagers.cluster.agent import register_flush_hook

    register_flush_hook(drain_prefect_services)  # idempotent


class _SentToAPI:
    """Logging filter: drop flow/task-run records, which reach the API on their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(("prefect.task_runs", "prefect.flow_runs"))


_SENT_TO_API = _SentToAPI()


def _keep_api_records_off_stderr() -> None:
    """Keep task-run logs off the worker's stderr: the driver shows every stderr line in the
    flow's log, where these records would appear a second time."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and _SENT_TO_API not in handler.filters:
            handler.addFilter(_SENT_TO_API)


def _result_by_reference(state: Any, task: Any) -> Any:
    """A result persisted in the shared default result storage (the manifest's blob container)
    goes back as its record's metadata, not its value: the driver reads it from the storage
    only when asked (Prefect's own path for a state's `ResultRecordMetadata`), so a large
    result the user asked to persist does not travel through the SSH channel too."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultRecord, get_default_result_storage

    record = state.data
    if task.persist_result is not True or not isinstance(record, ResultRecord):
        return state
    storage = get_default_result_storage()
    shared_id = getattr(storage, "_block_document_id", None)
    if shared_id is None or isinstance(storage, LocalFileSystem) or record.metadata.storage_block_id != shared_id:
        return state
    return state.model_copy(update={"data": record.metadata})


def _note_remote_traceback(state: Any) -> None:
    """Attach the worker's traceback to a failed task's exception (tracebacks do not pickle)."""
    if not state.is_failed():
        return
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException) and exc.__traceback__ is not None:
        text = "".join(traceback.format_exception(exc)).rstrip()
        exc.add_note(f"Remote traceback (on {socket.gethostname()}):\n{text}")


def _api_unreachable(settings_context: dict[str, Any], exc: Exception) -> Exception:
    from prefect_azmanagers.exceptions import PrefectAPIUnreachable

    url = settings_context.get("settings", {}).get("api", {}).get("url")
    return PrefectAPIUnreachable(
        f"The worker on {socket.gethostname()} could not reach the Prefect API at {url}: "
        f"{exc}. Use a loopback API URL on the driver (it is forwarded through SSH) or set "
        "the manifest's prefect_api_url_for_vms to an address the VMs can reach."
    )
