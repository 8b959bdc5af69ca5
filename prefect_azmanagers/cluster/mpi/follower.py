"""Ranks > 0 of an MPI worker: run every call rank 0 sends, as attempts, until told to stop.

They never write to stdout (rank 0's protocol stream): their stdout and stderr lines go to
stderr tagged `[rank r]` (the driver logs the agent's stderr), and they wait for calls without
spinning. A plain call is one attempt, run when its payload arrives; a `RankedCall` runs
`follow(announcement)` once per attempt rank 0 announces. If rank 0 cannot run at all (a task's
C code holding its GIL), the lowest failed rank reports the call on the protocol stream itself
and aborts the job.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from typing import Any, Callable

import cloudpickle

from prefect_azmanagers.cluster.mpi.ranks import (
    FAILURE_GRACE_SECONDS,
    Backoff,
    RankedCall,
    Tag,
    finish_tagged_output,
    load_call,
    tag_lines,
)
from prefect_azmanagers.exceptions import MPIRankError

# A failed rank whose failure rank 0 has not settled by then concludes that rank 0 cannot run
# (C code holding its GIL) and reports the call itself. Rank 0 settles a failure, or ends the
# worker, within about FAILURE_GRACE_SECONDS when it can run at all.
UNSETTLED_SECONDS = 5 * FAILURE_GRACE_SECONDS


def follow(flush: Callable[[], None]) -> None:
    """Ranks > 0: run every call rank 0 sends until told to stop, then `flush` (the agent's
    flush hooks, e.g. draining this rank's Prefect logs); never returns."""
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    protocol = os.dup(1)  # kept only to report a failure rank 0 is too stuck to report
    os.dup2(2, 1)  # stdout is rank 0's protocol stream: never write to it
    taggers = [tag_lines(fd, f"[rank {rank}] ".encode()) for fd in (1, 2)]
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    control = MPI.COMM_WORLD.Dup()
    backoff = Backoff()
    while True:
        message = _wait_for(control, Tag.RUN, backoff, timeout=None)
        if message is None:
            break
        task_id, payload = message
        call = load_call(payload)
        if not isinstance(call, RankedCall):
            _run_attempt(control, protocol, backoff, task_id, 1, call)
            continue
        # rank 0 announces each attempt it makes, then None when the call is over
        while (attempt := _wait_for(control, Tag.ATTEMPT, backoff, timeout=None)) is not None:
            number, announcement = attempt
            _run_attempt(control, protocol, backoff, task_id, number,
                         functools.partial(call.follow, announcement))
    flush()  # as the agent does at exit
    MPI.Finalize()
    finish_tagged_output(taggers)
    os._exit(0)


def _run_attempt(control: Any, protocol: int, backoff: Backoff, task_id: int, attempt: int,
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
    sent = control.isend(outcome, dest=0, tag=Tag.OUTCOME)  # rank 0 may be unable to receive
    backoff.active()
    if outcome is None:
        sent.wait()
        return
    peers = [control.isend((task_id, attempt), dest=p, tag=Tag.PEER_FAILED)
             for p in range(1, control.Get_size()) if p != rank]
    if _wait_for(control, Tag.SETTLED, backoff, UNSETTLED_SECONDS) is _TIMED_OUT:
        # one report per attempt: the lowest failed rank sends it, the others only end the job
        report = not _lower_rank_failed(control, rank, (task_id, attempt))
        _report_and_abort(protocol, task_id, report, rank, control.Get_size(), outcome)
    MPI.Request.waitall([sent, *peers])


_TIMED_OUT = object()
_ATOMIC_WRITE = 4096  # a pipe write up to PIPE_BUF bytes is never split or interleaved


def _wait_for(control: Any, tag: int, backoff: Backoff, timeout: float | None) -> Any:
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
    while control.Iprobe(source=MPI.ANY_SOURCE, tag=Tag.PEER_FAILED, status=status):
        peer = status.Get_source()
        found |= control.recv(source=peer, tag=Tag.PEER_FAILED) == attempt and peer < rank
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
