"""Rank 0 of an MPI worker: the agent the driver talks to, running each call on every rank.

For every call rank 0 sends the pickled payload to the other ranks, runs the call itself, and
waits until every rank reported; the result is rank 0's, and an exception on any rank fails the
call with that rank's traceback (`MPIRankError`). A rank that fails while others are still
inside the attempt (possibly blocked in a collective that can never complete) poisons the
worker: the failure is reported, then the whole worker exits and the engine restarts the slot.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

from prefect_azmanagers.cluster.mpi import launched_by_mpi
from prefect_azmanagers.cluster.mpi.follower import follow
from prefect_azmanagers.cluster.mpi.ranks import (
    FAILURE_GRACE_SECONDS,
    Backoff,
    RankedCall,
    Tag,
    finish_tagged_output,
    load_call,
    tag_lines,
)
from prefect_azmanagers.cluster.protocol import Payload
from prefect_azmanagers.exceptions import MPIRankError

_NOTHING = object()


class Leader:
    """Rank 0's side: runs each call on every rank and combines the outcomes.

    A call runs on ranks > 0 as attempts: a plain callable is one attempt, started with the
    call; a `RankedCall` gets this leader as its `RankZero` and announces each of its attempts
    (`begin_attempt`), possibly none. Outcomes, failures and their grace period are those of
    the current attempt.
    """

    def __init__(self) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self.control = MPI.COMM_WORLD.Dup()
        self.size = self.control.Get_size()
        self.poisoned = False
        self._busy = False
        self._changed = threading.Condition()
        self._per_attempt = False
        self._attempt = 0  # attempts started in this call
        self._announcement: Any = _NOTHING  # an attempt begun on rank 0, not sent yet
        self._announced = 0  # the last attempt sent to the ranks
        self._rank0_in_attempt = False
        self._outcomes: dict[int, dict[str, str] | None] = {}
        self._failed_at: float | None = None
        self._settled = False
        self._surfaced = False
        self._taggers: list[threading.Thread] = []

    def tag_output(self) -> None:
        """Prefix rank 0's stdout and stderr lines with `[rank 0]` (after the agent took stdio)."""
        self._taggers = [tag_lines(fd, b"[rank 0] ") for fd in (1, 2)]

    def execute(self, task_id: int, payload: bytes | Payload) -> Any:
        """Run the call on all ranks; rank 0's value, or the first failing rank's error."""
        self._busy = True
        call = load_call(payload)
        with self._changed:
            self._per_attempt = isinstance(call, RankedCall)
            self._attempt = self._announced = 0
            self._outcomes, self._failed_at, self._settled = {}, None, False
            self._rank0_in_attempt = self._surfaced = False
            if not self._per_attempt:
                self._start_attempt()
        # Delivered before the call starts: a large payload needs rank 0 to drive MPI progress,
        # which it cannot do while the call's C code holds the GIL.
        self._send_to_ranks((task_id, payload), Tag.RUN)
        local: dict[str, Any] = {}

        def run() -> None:
            try:
                local["value"] = call.lead(self) if isinstance(call, RankedCall) else call()
            except BaseException as exc:  # noqa: BLE001 - reported as the call's failure
                local["error"] = exc
            with self._changed:
                if not self._per_attempt:
                    self._end_attempt_on_rank0(failed="error" in local)
                local["done"] = True
                self._changed.notify_all()

        threading.Thread(target=run, daemon=True, name="azm-mpi-rank0").start()
        self._serve(local)
        if not self.poisoned:
            if self._per_attempt:  # the ranks stop waiting for attempts of this call
                self._send_to_ranks(None, Tag.ATTEMPT)
            self._busy = False
        if "error" in local:
            raise local["error"]
        failure = self._first_failure()
        if failure is not None and not self._surfaced:
            raise failure
        if "value" not in local:  # the worker is poisoned: a rank is stuck in a failed attempt
            raise failure or self._stuck_error()
        return local["value"]

    def _serve(self, local: dict[str, Any]) -> None:
        """Until the call ended on every rank: send announced attempts, collect outcomes,
        settle finished attempts, and poison the worker when a failed attempt cannot end."""
        backoff = Backoff()
        status = self._mpi.Status()
        while True:
            with self._changed:
                announcement, self._announcement = self._announcement, _NOTHING
                attempt = self._attempt
            if announcement is not _NOTHING:
                self._send_to_ranks((attempt, announcement), Tag.ATTEMPT)
                backoff.active()
                with self._changed:
                    self._announced = attempt
                    self._changed.notify_all()
            while self.control.Iprobe(source=self._mpi.ANY_SOURCE, tag=Tag.OUTCOME, status=status):
                source = status.Get_source()
                outcome = self.control.recv(source=source, tag=Tag.OUTCOME)
                with self._changed:
                    self._outcomes[source] = outcome
                    if outcome and self._failed_at is None:
                        self._failed_at = time.monotonic()
                    self._changed.notify_all()
                backoff.active()
            with self._changed:
                if self._attempt_over() and not self._settled:
                    self._settle()
                if "done" in local and (self._attempt == 0 or self._settled):
                    return
                if (self._failed_at is not None and not self._attempt_over()
                        and time.monotonic() - self._failed_at > FAILURE_GRACE_SECONDS):
                    self.poisoned = True
                    self._changed.notify_all()
                    return
                self._changed.wait(backoff.interval())

    def _send_to_ranks(self, message: Any, tag: int) -> None:
        self._mpi.Request.waitall([self.control.isend(message, dest=r, tag=tag)
                                   for r in range(1, self.size)])

    def _start_attempt(self) -> None:
        self._attempt += 1
        self._outcomes, self._failed_at, self._settled = {}, None, False
        self._rank0_in_attempt, self._surfaced = True, False

    def _end_attempt_on_rank0(self, failed: bool) -> None:
        self._rank0_in_attempt = False
        if failed and self._failed_at is None:
            self._failed_at = time.monotonic()
        self._changed.notify_all()

    def _attempt_over(self) -> bool:
        return not self._rank0_in_attempt and len(self._outcomes) == self.size - 1

    def _settle(self) -> None:
        """Tell the ranks that failed the attempt that their failure is handled (see follow):
        rank 0 has left the attempt, so it is not stuck."""
        self._mpi.Request.waitall([self.control.isend(None, dest=rank, tag=Tag.SETTLED)
                                   for rank, outcome in self._outcomes.items() if outcome])
        self._settled = True
        self._changed.notify_all()

    def begin_attempt(self, announcement: Any) -> None:
        """Inside a call on rank 0: start an attempt on the other ranks, which run the call's
        follower part with `announcement`, once the previous attempt is settled there."""
        with self._changed:
            if not self._per_attempt:
                raise RuntimeError("begin_attempt is for a RankedCall's lead(); a plain call "
                                   "runs once on every rank")
            self._changed.wait_for(lambda: self.poisoned or self._attempt == 0 or self._settled)
            if self.poisoned:
                raise self._first_failure() or self._stuck_error()
            self._start_attempt()
            self._announcement = announcement
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.poisoned or self._announced == self._attempt)
            if self.poisoned:
                raise self._first_failure() or self._stuck_error()

    def _stuck_error(self) -> MPIRankError:
        """Why a poisoned call ends: the lowest rank still inside its failed attempt."""
        rank = min(set(range(1, self.size)) - set(self._outcomes), default=0)
        return MPIRankError(rank, self.size, "Stuck",
                            f"rank {rank} did not finish attempt {self._attempt} within "
                            f"{FAILURE_GRACE_SECONDS}s after the attempt failed on another rank "
                            "(blocked in a collective?); the worker restarts", "")

    def _first_failure(self) -> MPIRankError | None:
        for rank in sorted(self._outcomes):
            failure = self._outcomes[rank]
            if failure:
                return MPIRankError(rank, self.size, failure["type"], failure["message"],
                                    failure["traceback"])
        return None

    def own_failure_stands(self) -> None:
        """Inside a call on rank 0 that is failing: its own failure is the call's (or the
        attempt's) outcome; an attempt ends on rank 0 with it."""
        with self._changed:
            self._surfaced = True
            if self._per_attempt:
                self._end_attempt_on_rank0(failed=True)

    def wait_for_ranks(self) -> None:
        """Inside a call on rank 0: wait until every other rank finished it; raise the first
        failure (once raised here, the call's own outcome stands for it)."""
        with self._changed:
            self._changed.wait_for(lambda: self._first_failure() is not None
                                   or len(self._outcomes) == self.size - 1)
            if self._per_attempt:
                self._end_attempt_on_rank0(failed=False)
            failure = self._first_failure()
            if failure is not None:
                self._surfaced = True
                raise failure

    def after_call(self) -> None:
        """Once the failure of a stuck call is reported, end the worker (the engine restarts it)."""
        if self.poisoned:
            print("azmanagers agent: MPI ranks still inside a failed call after "
                  f"{FAILURE_GRACE_SECONDS}s; ending this worker so it restarts clean",
                  file=sys.stderr, flush=True)
            finish_tagged_output(self._taggers)
            os._exit(70)

    def stop_followers(self) -> None:
        """Tell ranks > 0 to exit and finalize MPI (skipped when a call is still running)."""
        if self.poisoned or self._busy:
            return
        for rank in range(1, self.size):
            self.control.send(None, dest=rank, tag=Tag.RUN)
        self._mpi.Finalize()


def leader_or_follow(concurrency: int, flush: Callable[[], None]) -> Leader | None:
    """In the agent, before it takes over stdio: None outside MPI; ranks > 0 never return
    (they run `flush`, the agent's flush hooks, before they exit)."""
    if not launched_by_mpi():
        return None
    import mpi4py

    # mpi4py's default tree reduction keeps the GIL while it waits, so a rank 0 waiting in a
    # task's allreduce could neither heartbeat nor notice a failed rank; gather+bcast does not.
    mpi4py.rc.fast_reduce = False
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() > 0:
        follow(flush)
    if concurrency != 1:
        raise SystemExit("azmanagers agent: --concurrency must be 1 under MPI (every call runs "
                         "on all ranks, in order)")
    return Leader()

