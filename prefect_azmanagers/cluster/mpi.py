"""MPI ranks per worker: the launcher command and the rank side of the agent.

With `mpi_ranks_per_worker=K` a worker is `mpirun -n K <flags> <python> -m
prefect_azmanagers.cluster.agent ...` (see `launcher`). Open MPI gives mpirun's stdin to rank 0
and carries every rank's stdout back on mpirun's stdout, so:

- rank 0 is the agent the driver talks to (`Leader`): for every call it sends the pickled
  payload to the other ranks, runs the call itself, and waits until every rank reported; the
  result is rank 0's, an exception on any rank fails the call with that rank's traceback
  (`MPIRankError`);
- ranks > 0 (`follow`) never write to stdout: their stdout and stderr lines go to stderr tagged
  `[rank r]` (the driver logs the agent's stderr), and they wait for calls without spinning.

Ranks > 0 run a call as attempts. A plain callable is one attempt: every rank runs it when the
payload arrives. A callable may define `__azm_mpi_follower__(announcement)`: rank 0 alone runs
the callable, which announces each attempt at its work (`begin_attempt`), and ranks > 0 call
the follower part once per announcement until rank 0's call returns ("call over"; zero
attempts is fine). The task runner uses it so that ranks > 0 run the bare task function exactly
when and as often as Prefect's engine on rank 0 runs the task body (each retry; never for a
cached result), in that task run's context, while only rank 0's engine reports its states.

Control messages travel on a duplicate of COMM_WORLD, so a task's own messages on
`prefect_azmanagers.mpi.comm()` (COMM_WORLD) never mix with them. A rank that fails while others
are still inside the attempt (possibly blocked in a collective that can never complete) poisons
the worker: the failure is reported, then the whole worker exits and the engine restarts the
slot. If rank 0 cannot run at all (a task's C code holding its GIL), the lowest failed rank
reports the call on the protocol stream itself and aborts the job.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys
import threading
import time
import traceback
from typing import Any, Callable

import cloudpickle

from prefect_azmanagers.cluster.protocol import Payload, load_payload
from prefect_azmanagers.exceptions import ConfigurationError, MPIRankError

# Portable for Open MPI (Debian's MPI): K ranks may exceed the instance's cores (the original's
# `-bind-to core:$OMP_NUM_THREADS --map-by numa` assumes whole-machine HPC sizes).
DEFAULT_MPI_FLAGS = "--bind-to none --oversubscribe"
FOLLOWER_ATTRIBUTE = "__azm_mpi_follower__"

_RUN, _OUTCOME, _SETTLED, _PEER_FAILED, _ATTEMPT = 1, 2, 3, 4, 5
_NOTHING = object()
# After one rank failed, how long the others may take to finish the call before the worker is
# considered stuck (e.g. in a collective the failed rank never joins) and restarted.
FAILURE_GRACE_SECONDS = 2.0
# A failed rank whose failure rank 0 has not settled by then concludes that rank 0 cannot run
# (C code holding its GIL) and reports the call itself. Rank 0 settles a failure, or ends the
# worker, within about FAILURE_GRACE_SECONDS when it can run at all.
UNSETTLED_SECONDS = 5 * FAILURE_GRACE_SECONDS
_MIN_SLEEP, _MAX_IDLE_SLEEP = 0.0002, 0.01
_HOT_SECONDS = 0.1  # after activity, keep polling fast this long: calls come back to back


class _Backoff:
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


def launcher(ranks: int, flags: str = DEFAULT_MPI_FLAGS) -> list[str]:
    """The words that prefix the agent command to start `ranks` ranks (transport.agent_command)."""
    if ranks < 1:
        raise ConfigurationError(f"mpi_ranks_per_worker must be at least 1 to use MPI, got {ranks}.")
    try:
        extra = shlex.split(flags)
    except ValueError as exc:
        raise ConfigurationError(f"mpi_flags {flags!r} is not a valid shell word list: {exc}") from exc
    return ["mpirun", "-n", str(ranks), *extra]


def launched_by_mpi() -> bool:
    """True in a process started by mpirun/mpiexec (Open MPI or a PMI-based launcher)."""
    return any(name in os.environ for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def _load_call(payload: bytes | Payload) -> tuple[Callable[[], Any], Callable[[Any], Any] | None]:
    """The call's callable and its follower part (None: the callable runs once on every rank).
    A payload that cannot be loaded is a plain call that raises why (each rank reports it)."""
    try:
        target = load_payload(payload)
    except BaseException as exc:  # noqa: BLE001 - the call's failure, reported by every rank
        return functools.partial(_raise, exc), None
    return target, getattr(target, FOLLOWER_ATTRIBUTE, None)


def _raise(exc: BaseException) -> None:
    raise exc


def _tag_lines(fd: int, prefix: bytes) -> threading.Thread:
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


def _finish_tagged_output(taggers: list[threading.Thread]) -> None:
    """Before exiting: end the tagged streams and let their last lines through."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    for tagger in taggers:
        tagger.join(timeout=2.0)


class Leader:
    """Rank 0's side: runs each call on every rank and combines the outcomes.

    A call runs on ranks > 0 as attempts: a plain callable is one attempt, started with the
    call; a callable with a follower part announces each of its attempts (`begin_attempt`),
    possibly none. Outcomes, failures and their grace period are those of the current attempt.
    """

    def __init__(self) -> None:
        from mpi4py import MPI

        global _leader
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
        _leader = self

    def tag_output(self) -> None:
        """Prefix rank 0's stdout and stderr lines with `[rank 0]` (after the agent took stdio)."""
        self._taggers = [_tag_lines(fd, b"[rank 0] ") for fd in (1, 2)]

    def execute(self, task_id: int, payload: bytes | Payload) -> Any:
        """Run the call on all ranks; rank 0's value, or the first failing rank's error."""
        self._busy = True
        target, follower = _load_call(payload)
        with self._changed:
            self._per_attempt = follower is not None
            self._attempt = self._announced = 0
            self._outcomes, self._failed_at, self._settled = {}, None, False
            self._rank0_in_attempt = self._surfaced = False
            if not self._per_attempt:
                self._start_attempt()
        # Delivered before the call starts: a large payload needs rank 0 to drive MPI progress,
        # which it cannot do while the call's C code holds the GIL.
        self._send_to_ranks((task_id, payload), _RUN)
        local: dict[str, Any] = {}

        def run() -> None:
            try:
                local["value"] = target()
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
                self._send_to_ranks(None, _ATTEMPT)
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
        backoff = _Backoff()
        status = self._mpi.Status()
        while True:
            with self._changed:
                announcement, self._announcement = self._announcement, _NOTHING
                attempt = self._attempt
            if announcement is not _NOTHING:
                self._send_to_ranks((attempt, announcement), _ATTEMPT)
                backoff.active()
                with self._changed:
                    self._announced = attempt
                    self._changed.notify_all()
            while self.control.Iprobe(source=self._mpi.ANY_SOURCE, tag=_OUTCOME, status=status):
                source = status.Get_source()
                outcome = self.control.recv(source=source, tag=_OUTCOME)
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
        self._mpi.Request.waitall([self.control.isend(None, dest=rank, tag=_SETTLED)
                                   for rank, outcome in self._outcomes.items() if outcome])
        self._settled = True
        self._changed.notify_all()

    def begin_attempt(self, announcement: Any) -> None:
        """Inside a call on rank 0: start an attempt on the other ranks, which run the call's
        follower part with `announcement`, once the previous attempt is settled there."""
        with self._changed:
            if not self._per_attempt:
                raise RuntimeError("begin_attempt is for calls whose callable defines "
                                   f"{FOLLOWER_ATTRIBUTE}; this call runs once on every rank")
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
            _finish_tagged_output(self._taggers)
            os._exit(70)

    def stop_followers(self) -> None:
        """Tell ranks > 0 to exit and finalize MPI (skipped when a call is still running)."""
        if self.poisoned or self._busy:
            return
        for rank in range(1, self.size):
            self.control.send(None, dest=rank, tag=_RUN)
        self._mpi.Finalize()


def follow() -> None:
    """Ranks > 0: run every call rank 0 sends until told to stop; never returns."""
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    protocol = os.dup(1)  # kept only to report a failure rank 0 is too stuck to report
    os.dup2(2, 1)  # stdout is rank 0's protocol stream: never write to it
    taggers = [_tag_lines(fd, f"[rank {rank}] ".encode()) for fd in (1, 2)]
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    control = MPI.COMM_WORLD.Dup()
    backoff = _Backoff()
    while True:
        message = _wait_for(control, _RUN, backoff, timeout=None)
        if message is None:
            break
        task_id, payload = message
        target, follower = _load_call(payload)
        if follower is None:
            _run_attempt(control, protocol, backoff, task_id, 1, target)
            continue
        # rank 0 announces each attempt it makes, then None when the call is over
        while (attempt := _wait_for(control, _ATTEMPT, backoff, timeout=None)) is not None:
            number, announcement = attempt
            _run_attempt(control, protocol, backoff, task_id, number,
                         functools.partial(follower, announcement))
    from prefect_azmanagers.cluster import agent

    agent.run_flush_hooks()  # as the agent does at exit: e.g. drain this rank's Prefect logs
    MPI.Finalize()
    _finish_tagged_output(taggers)
    os._exit(0)


def _run_attempt(control: Any, protocol: int, backoff: _Backoff, task_id: int, attempt: int,
                 run: Callable[[], Any]) -> None:
    """Run one attempt of a call on this rank and report its outcome to rank 0; after a
    failure, wait until rank 0 settled it, or report it ourselves and abort if rank 0 cannot."""
    from mpi4py import MPI

    rank = control.Get_rank()
    outcome: dict[str, str] | None = None
    try:
        run()
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0
        outcome = {"type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                   "message": str(exc), "traceback": traceback.format_exc()}
    sys.stdout.flush()
    sys.stderr.flush()
    sent = control.isend(outcome, dest=0, tag=_OUTCOME)  # rank 0 may be unable to receive
    backoff.active()
    if outcome is None:
        sent.wait()
        return
    peers = [control.isend((task_id, attempt), dest=p, tag=_PEER_FAILED)
             for p in range(1, control.Get_size()) if p != rank]
    if _wait_for(control, _SETTLED, backoff, UNSETTLED_SECONDS) is _TIMED_OUT:
        # one report per attempt: the lowest failed rank sends it, the others only end the job
        report = not _lower_rank_failed(control, rank, (task_id, attempt))
        _report_and_abort(protocol, task_id, report, rank, control.Get_size(), outcome)
    MPI.Request.waitall([sent, *peers])


_TIMED_OUT = object()
_ATOMIC_WRITE = 4096  # a pipe write up to PIPE_BUF bytes is never split or interleaved


def _wait_for(control: Any, tag: int, backoff: _Backoff, timeout: float | None) -> Any:
    """Receive the next message with `tag` from rank 0, polling with sleeps (a blocking
    receive would spin a core for as long as we wait); _TIMED_OUT after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not control.Iprobe(source=0, tag=tag):
        if deadline is not None and time.monotonic() > deadline:
            return _TIMED_OUT
        time.sleep(backoff.interval())
    return control.recv(source=0, tag=tag)


def _lower_rank_failed(control: Any, rank: int, attempt: tuple[int, int]) -> bool:
    """Whether a rank below this one (but above 0) also failed `attempt` (task id, attempt
    number); notices of earlier attempts are consumed and ignored."""
    from mpi4py import MPI

    found = False
    status = MPI.Status()
    while control.Iprobe(source=MPI.ANY_SOURCE, tag=_PEER_FAILED, status=status):
        peer = status.Get_source()
        found |= control.recv(source=peer, tag=_PEER_FAILED) == attempt and peer < rank
    return found


def _report_and_abort(protocol: int, task_id: int, report: bool, rank: int, size: int,
                      outcome: dict[str, str]) -> None:
    """Rank 0 did not acknowledge the failure: a task's C code holds its GIL (so its agent can
    run nothing), and it may wait for this rank forever. It cannot report: send the task's ERROR frame on the protocol stream
    ourselves (`report`), in one write small enough to stay whole, then end the worker."""
    from prefect_azmanagers.cluster.protocol import Kind, encode_json

    frame = b""
    for keep in (600, 300, 100, 0):
        error = MPIRankError(rank, size, outcome["type"], outcome["message"][:keep],
                             outcome["traceback"][-keep:])
        frame = encode_json(Kind.ERROR, {
            "type": f"{MPIRankError.__module__}.MPIRankError", "message": str(error),
            "traceback": error.remote_traceback, "exception": cloudpickle.dumps(error).hex(),
        }, task_id)
        if len(frame) <= _ATOMIC_WRITE:
            break
    print(f"rank 0 is stuck after this rank failed task {task_id}; ending the worker so it "
          "restarts clean", file=sys.stderr, flush=True)
    if report:
        os.write(protocol, frame)
    time.sleep(3.0)  # let mpirun forward the frame before the job is torn down
    from mpi4py import MPI

    MPI.COMM_WORLD.Abort(70)


_leader: Leader | None = None


def own_failure_stands() -> None:
    """Called by a failing call on rank 0: its own failure is the call's outcome, even if other
    ranks fail too (without it, another rank's failure would replace a returned result)."""
    if _leader is not None:
        _leader.own_failure_stands()


def begin_attempt(announcement: Any) -> None:
    """Called on rank 0 by a call whose callable has a follower part, before each attempt at
    its work: ranks > 0 then run `follower(announcement)` once (after the previous attempt
    ended on every rank). End the attempt with `wait_for_ranks()` or, when it failed on rank 0,
    `own_failure_stands()`. No-op outside an MPI worker."""
    if _leader is not None:
        _leader.begin_attempt(announcement)


def wait_for_ranks() -> None:
    """Called by a running call on rank 0: block until ranks > 0 finished the same call and
    raise `MPIRankError` if one failed, so the call can record that failure as its own (the
    task runner does this so a task's Prefect state says which rank failed). No-op elsewhere."""
    if _leader is not None:
        _leader.wait_for_ranks()


def leader_or_follow(concurrency: int) -> Leader | None:
    """In the agent, before it takes over stdio: None outside MPI; ranks > 0 never return."""
    if not launched_by_mpi():
        return None
    import mpi4py

    # mpi4py's default tree reduction keeps the GIL while it waits, so a rank 0 waiting in a
    # task's allreduce could neither heartbeat nor notice a failed rank; gather+bcast does not.
    mpi4py.rc.fast_reduce = False
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() > 0:
        follow()
    if concurrency != 1:
        raise SystemExit("azmanagers agent: --concurrency must be 1 under MPI (every call runs "
                         "on all ranks, in order)")
    return Leader()

