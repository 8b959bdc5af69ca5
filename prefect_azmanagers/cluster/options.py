"""Every option of a cluster, declared once: `AzureCluster` and `AzureScaleSetTaskRunner` take
them as keywords and check them here, at construction, before anything is provisioned."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from prefect_azmanagers.azure.provisioning import ProvisioningOptions
from prefect_azmanagers.cluster.adapt import Adapt
from prefect_azmanagers.cluster.mpi import DEFAULT_MPI_FLAGS
from prefect_azmanagers.customenv import EnvironmentSpec
from prefect_azmanagers.exceptions import ConfigurationError

DEFAULT_IMDS_URL = "http://169.254.169.254"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
PREFECT_WARM_UP = "prefect_azmanagers._remote_task:warm_up"  # a name only: no import of Prefect here
_WARM_UP = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")
_SCALESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


@dataclass(frozen=True)
class ClusterOptions(ProvisioningOptions):
    """The options of `AzureCluster` (and of the task runner, which passes them on).

    Attributes (besides ProvisioningOptions' spot, priority-mix and image options):
        ppi: agent processes (worker slots) per instance.
        group: the scale set's name. Unset (the default), each cluster gets a scale set of
            its own, `azm-<cluster id>`, so concurrent flows never share instances. Named,
            it is created if missing and deleted when empty at close; while a live cluster
            holds it (its lease tag is fresh), another cluster naming it is refused.
        customenv: build the driver's Python environment on the instances at boot: True
            captures it at start; an `EnvironmentSpec` (`capture_environment()`) is reused.
        mpi_ranks_per_worker, mpi_flags: each slot runs `mpirun -n K <flags>` agents.
        env: environment variables of the worker processes (shell-quoted; redacted in logs
            and errors, and ~/.azmanagers/env.sh on instances is 0600).
        join_timeout: seconds an instance may take from request to joined; `waitfor` deadline.
        max_task_retries_on_lost_worker: times a call is re-queued after losing its worker.
        replace_lost_workers: grow the scale set again for instances lost or failed.
        max_replacements: bound on such replacements (default 2 * n).
        waitfor: `start()` blocks until n * ppi workers joined (JoinTimeout otherwise).
        forward_ports: driver loopback TCP ports made reachable on every instance's loopback.
        progress: show a rich progress bar of the joins.
        concurrency: callables one slot runs at once (threads in the agent).
        heartbeat_timeout: seconds without any frame from a busy agent before it counts as lost.
        imds_url: where spot agents poll scheduled events.
        adapt: adaptive capacity (`Adapt(minimum=, maximum=, idle_timeout=, ...)`): the
            cluster grows with queued and running work and removes idle instances; n is then
            the initial size (default: the minimum).
        spot_fallback, spot_fallback_after: with spot, after this many evictions new
            instances are regular priority (a second scale set, `<group>-regular`).
        max_in_flight: calls sent to workers and not answered, at most (the task runner's
            task runs each report to the Prefect API: this bounds the load they put on it).
        prefect_api: the API the calls report to (the task runner sets its own); its /health
            is probed every 2 s: 429/503, failures and slow answers slow dispatch down.
        api_give_up_after: seconds of nothing but failures from `prefect_api` after which
            every queued and running call fails with PrefectAPIUnreachable.
        max_unrecorded: task runs sent but not recorded by the Prefect API yet, at most (the
            task runner counts them; a server that falls behind, e.g. SQLite with in-memory
            messaging, would otherwise drop their events). None: no such bound.
        warm_up: "MODULE:FUNCTION" every agent (every MPI rank) calls before it joins, so the
            first call pays no import. The default imports Prefect's task engine (2-4 s of a
            fresh process): a cluster made for flows, shared by them or not, joins ready for
            their first task. None: agents join light (~0.1 s), for plain callables only.
    """

    ppi: int = 1
    group: str | None = None
    customenv: bool | EnvironmentSpec = False
    mpi_ranks_per_worker: int = 0
    mpi_flags: str | None = DEFAULT_MPI_FLAGS
    env: Mapping[str, str] = field(default_factory=dict)
    join_timeout: float = 720.0
    max_task_retries_on_lost_worker: int = 3
    replace_lost_workers: bool = True
    max_replacements: int | None = None
    waitfor: bool = False
    forward_ports: Sequence[int] = ()
    progress: bool = True
    concurrency: int = 1
    heartbeat_timeout: float = 300.0
    imds_url: str = DEFAULT_IMDS_URL
    adapt: Adapt | None = None
    spot_fallback: bool = False
    spot_fallback_after: int = 3
    max_in_flight: int = 256
    prefect_api: str | None = None
    api_give_up_after: float = 300.0
    max_unrecorded: int | None = 512
    warm_up: str | None = PREFECT_WARM_UP

    @classmethod
    def from_keywords(cls, options: Mapping[str, Any]) -> ClusterOptions:
        """Options from keyword arguments; an unknown name is a ConfigurationError listing the
        known ones (a typo must not be ignored, nor surface as a bare TypeError)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown cluster option(s) {', '.join(unknown)}; the options are: "
                f"{', '.join(sorted(known))}")
        return cls(**options)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mpi_flags is None:  # "the default", as the task runner has always taken it
            object.__setattr__(self, "mpi_flags", DEFAULT_MPI_FLAGS)
        _at_least("ppi", self.ppi, 1)
        _at_least("concurrency", self.concurrency, 1)
        _at_least("mpi_ranks_per_worker", self.mpi_ranks_per_worker, 0)
        _at_least("max_task_retries_on_lost_worker", self.max_task_retries_on_lost_worker, 0)
        if self.max_replacements is not None:
            _at_least("max_replacements", self.max_replacements, 0)
        _at_least("max_in_flight", self.max_in_flight, 1)
        if self.max_unrecorded is not None:
            _at_least("max_unrecorded", self.max_unrecorded, 1)
        for name in ("join_timeout", "heartbeat_timeout", "api_give_up_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.mpi_ranks_per_worker and self.concurrency != 1:
            raise ConfigurationError("mpi_ranks_per_worker needs concurrency=1: every call runs "
                                     "on all ranks of a worker, one call at a time")
        for name in self.env:
            if not isinstance(name, str) or not _ENV_NAME.match(name):
                raise ConfigurationError(
                    f"env: {name!r} is not a valid environment variable name (letters, digits "
                    "and _, not starting with a digit)")
        _at_least("spot_fallback_after", self.spot_fallback_after, 1)
        if self.warm_up is not None and not _WARM_UP.match(str(self.warm_up)):
            raise ConfigurationError(
                f"warm_up: {self.warm_up!r} is not MODULE:FUNCTION (e.g. 'mypackage.setup:warm')")
        if self.spot_fallback and not self.spot:
            raise ConfigurationError("spot_fallback falls back from spot instances: pass spot=True too.")
        if self.adapt is not None and not isinstance(self.adapt, Adapt):
            raise ConfigurationError(f"adapt must be an Adapt(...), got {self.adapt!r}")
        if self.group is not None and not _SCALESET_NAME.match(str(self.group)):
            raise ConfigurationError(
                f"group: {self.group!r} is not a scale-set name (1-64 letters, digits, '-', '_' "
                "or '.', starting with a letter or digit)")
        for port in self.forward_ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigurationError(f"forward_ports: {port!r} is not a TCP port (1..65535)")
        # Frozen: normalise the containers once, so that equal options compare equal.
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "forward_ports", tuple(self.forward_ports))

    @property
    def provisioning(self) -> ProvisioningOptions:
        """The part the scale set needs."""
        return ProvisioningOptions(**{f.name: getattr(self, f.name)
                                      for f in dataclasses.fields(ProvisioningOptions)})

    def replacements_for(self, n: int) -> int:
        """The replacement budget of a cluster of n instances."""
        return 2 * n if self.max_replacements is None else self.max_replacements


def _at_least(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_instance_count(n: Any, adapt: Adapt | None = None) -> int:
    """`n` instances to add: an integer >= 0 (with `adapt`, None means its minimum, and n
    must lie within its bounds)."""
    if n is None and adapt is not None:
        return adapt.minimum
    _at_least("n (instances to add)", n, 0)
    if adapt is not None and not adapt.minimum <= n <= adapt.maximum:
        raise ConfigurationError(
            f"n={n} lies outside adapt's bounds {adapt.minimum}..{adapt.maximum}")
    return n
