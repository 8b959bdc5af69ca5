"""What every rank of an MPI worker shares: control messages, polling and output tagging, and
the seam through which a call runs its attempts on every rank (`RankedCall`).

Control messages travel on a duplicate of COMM_WORLD, so a task's own messages on
`prefect_azmanagers.mpi.comm()` (COMM_WORLD) never mix with them.
"""

from __future__ import annotations

import abc
import enum
import functools
import os
import sys
import threading
import time
from typing import Any, Callable, Protocol

from prefect_azmanagers.cluster.protocol import Payload, load_payload


class Tag(enum.IntEnum):
    """Control message tags: rank 0 -> ranks (RUN a call, an ATTEMPT's announcement, a failure
    SETTLED); ranks -> rank 0 (an attempt's OUTCOME); ranks -> ranks (a PEER_FAILED notice)."""

    RUN = 1
    OUTCOME = 2
    SETTLED = 3
    PEER_FAILED = 4
    ATTEMPT = 5

# After one rank failed, how long the others may take to finish the call before the worker is
# considered stuck (e.g. in a collective the failed rank never joins) and restarted.
FAILURE_GRACE_SECONDS = 2.0
_MIN_SLEEP, _MAX_IDLE_SLEEP = 0.0002, 0.01
_HOT_SECONDS = 0.1  # after activity, keep polling fast this long: calls come back to back


class RankZero(Protocol):
    """What a `RankedCall` on rank 0 uses to run its attempts on the other ranks."""

    def begin_attempt(self, announcement: Any) -> None:
        """Start an attempt: ranks > 0 run `follow(announcement)` once (after the previous
        attempt ended on every rank)."""

    def wait_for_ranks(self) -> None:
        """End an attempt that succeeded on rank 0: wait for the other ranks and raise the
        first one's failure (`MPIRankError`) as this attempt's."""

    def own_failure_stands(self) -> None:
        """End an attempt that failed on rank 0: its own failure is the attempt's outcome."""


class RankedCall(abc.ABC):
    """A call that runs on rank 0 alone and announces each attempt at its work to the others.

    A plain callable runs once on every rank. A `RankedCall` runs `lead(ranks)` on rank 0, which
    calls `ranks.begin_attempt(announcement)` before each attempt (possibly never) and ends it
    with `ranks.wait_for_ranks()` or `ranks.own_failure_stands()`; ranks > 0 run
    `follow(announcement)` once per announcement. The task runner's calls are ranked, so that
    ranks > 0 run a task's function exactly when and as often as Prefect's engine on rank 0
    runs its body. Outside MPI, calling it runs `lead(None)`.
    """

    def __call__(self) -> Any:
        return self.lead(None)

    @abc.abstractmethod
    def lead(self, ranks: RankZero | None) -> Any:
        """The call on rank 0 (or on a worker without MPI, `ranks` None): its result."""

    @abc.abstractmethod
    def follow(self, announcement: Any) -> None:
        """One attempt on a rank > 0, as rank 0 announced it."""


def load_call(payload: bytes | Payload) -> Callable[[], Any] | RankedCall:
    """The call in `payload`. One that cannot be loaded is a plain call that raises why (each
    rank reports it)."""
    try:
        return load_payload(payload)
    except BaseException as exc:  # noqa: BLE001 - the call's failure, reported by every rank
        return functools.partial(_raise, exc)


def _raise(exc: BaseException) -> None:
    raise exc


class Backoff:
    """Poll intervals: short while work is recent, growing to _MAX_IDLE_SLEEP when idle, so a
    waiting rank neither spins a core (as a blocking MPI receive does) nor adds latency."""

    def __init__(self) -> None:
        self.active()

    def active(self) -> None:
        self._since = time.monotonic()
        self._sleep = _MIN_SLEEP

    def interval(self) -> float:
        if time.monotonic() - self._since > _HOT_SECONDS:
            self._sleep = min(self._sleep * 2, _MAX_IDLE_SLEEP)
        return self._sleep


def tag_lines(fd: int, prefix: bytes) -> threading.Thread:
    """Point `fd` at a pipe whose lines go, prefixed, to what `fd` was; a thread copies them.

    The copy of the old `fd` is closed at end of input, so a reader of it sees EOF in turn."""
    sink = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)

    def copy() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                os.write(sink, prefix + (line if line.endswith(b"\n") else line + b"\n"))
        os.close(sink)

    thread = threading.Thread(target=copy, daemon=True, name=f"azm-mpi-tag-{fd}")
    thread.start()
    return thread


def finish_tagged_output(taggers: list[threading.Thread]) -> None:
    """Before exiting: end the tagged streams and let their last lines through."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    for tagger in taggers:
        tagger.join(timeout=2.0)
