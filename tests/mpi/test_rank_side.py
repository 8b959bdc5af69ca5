"""The rank side of MPI workers, without SSH: the real agent under a real `mpirun`, driven
through its protocol on stdin/stdout exactly as the transport does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import cloudpickle
import pytest

from prefect_azmanagers.cluster.mpi import DEFAULT_MPI_FLAGS, launcher
from prefect_azmanagers.cluster.mpi.ranks import RankedCall, RankZero
from prefect_azmanagers.exceptions import MPIRankError
from prefect_azmanagers.cluster.protocol import HEADER, Frame, Kind, encode, parse_header
from prefect_azmanagers.cluster.transport import agent_command

pytestmark = pytest.mark.timeout(120)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the agent cannot import tests


class AgentUnderMPI:
    """`mpirun -n K ... agent` as the transport starts it; frames on stdout, lines on stderr."""

    def __init__(self, ranks: int):
        if not shutil.which("mpirun"):
            pytest.fail("mpirun is not installed (Debian: openmpi-bin)")
        words = launcher(ranks)
        if os.geteuid() == 0:  # instances run agents as their admin user; tests here run as root
            words.insert(1, "--allow-run-as-root")
        command = agent_command(sys.executable, worker_id=1, launcher=words)
        self.proc = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.stderr: list[str] = []
        self.late_outputs: list[Frame] = []  # OUTPUT frames after a call's result (see shutdown)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        hello = self.frame()
        assert hello.kind == Kind.HELLO, hello

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip("\n"))

    def frame(self) -> Frame:
        header = self.proc.stdout.read(HEADER.size)
        assert len(header) == HEADER.size, f"agent ended; stderr: {self.stderr}"
        length, kind, task_id = parse_header(header)
        return Frame(kind, task_id, self.proc.stdout.read(length))

    def call(self, fn, task_id: int = 1) -> tuple[Frame, list[Frame]]:
        """Send a RUN; return the RESULT/ERROR frame and the OUTPUT frames seen before it."""
        self.proc.stdin.write(encode(Kind.RUN, task_id, cloudpickle.dumps(fn)))
        self.proc.stdin.flush()
        outputs = []
        while True:
            frame = self.frame()
            if frame.kind in (Kind.RESULT, Kind.ERROR):
                return frame, outputs
            if frame.kind == Kind.OUTPUT:
                outputs.append(frame)

    def shutdown(self) -> int:
        try:
            self.proc.stdin.write(encode(Kind.SHUTDOWN))
            self.proc.stdin.flush()
            # A task's output is forwarded by threads, so it may come after the call's result;
            # the agent forwards all of it before BYE.
            while (frame := self.frame()).kind != Kind.BYE:
                if frame.kind == Kind.OUTPUT:
                    self.late_outputs.append(frame)
        except (AssertionError, BrokenPipeError):
            pass
        return self.wait()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
            self._reader.join(timeout=5)


@pytest.fixture
def agents():
    started: list[AgentUnderMPI] = []
    yield lambda k: started.append(AgentUnderMPI(k)) or started[-1]
    for agent in started:
        if agent.proc.poll() is None:
            os.killpg(agent.proc.pid, 9)
            agent.proc.wait()


def _allreduce():
    from prefect_azmanagers.mpi import comm

    c = comm()
    return c.Get_size(), c.allreduce(c.Get_rank() + 1)


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_allreduce_over_k_ranks_returns_rank0_result(agents, ranks):
    agent = agents(ranks)
    for task_id in (1, 2):  # the worker serves call after call
        frame, _ = agent.call(_allreduce, task_id)
        assert frame.kind == Kind.RESULT and frame.task_id == task_id
        assert cloudpickle.loads(frame.body) == (ranks, ranks * (ranks + 1) // 2)
    assert agent.shutdown() == 0


def _fail_on_rank(rank_to_fail: int, before_collective: bool):
    def task():
        from prefect_azmanagers.mpi import comm

        c = comm()
        if c.Get_rank() == rank_to_fail and before_collective:
            raise ValueError(f"boom on rank {c.Get_rank()}")
        total = c.allreduce(1)
        if c.Get_rank() == rank_to_fail:
            raise ValueError(f"boom on rank {c.Get_rank()}")
        return total
    return task


def test_failing_rank_after_collective_fails_the_call_and_worker_lives(agents):
    agent = agents(3)
    frame, _ = agent.call(_fail_on_rank(2, before_collective=False))
    assert frame.kind == Kind.ERROR
    body = frame.json()
    assert body["type"].endswith("MPIRankError")
    assert "MPI rank 2 of 3 failed: builtins.ValueError: boom on rank 2" in body["message"]
    error = cloudpickle.loads(bytes.fromhex(body["exception"]))
    assert isinstance(error, MPIRankError) and error.rank == 2
    assert "in task" in error.remote_traceback and "ValueError: boom on rank 2" in error.remote_traceback
    frame, _ = agent.call(_allreduce, 2)  # the worker is healthy afterwards
    assert cloudpickle.loads(frame.body) == (3, 6)
    assert agent.shutdown() == 0


def test_rank0_exception_keeps_its_type(agents):
    agent = agents(2)
    frame, _ = agent.call(_fail_on_rank(0, before_collective=False))
    assert frame.kind == Kind.ERROR
    assert frame.json()["type"] == "builtins.ValueError"
    assert "boom on rank 0" in frame.json()["message"]
    assert agent.shutdown() == 0


def _ranks_fail_while_rank0_holds_the_gil():
    import re

    from prefect_azmanagers.mpi import comm

    c = comm()
    if c.Get_rank() > 0:
        raise ValueError(f"boom on rank {c.Get_rank()}")
    re.match(r"(a+)+$", "a" * 60 + "b")  # C code keeping the GIL for far longer than the test


def test_rank_failing_before_a_collective_fails_the_call_then_ends_the_worker(agents):
    agent = agents(3)
    frame, _ = agent.call(_fail_on_rank(1, before_collective=True))
    assert frame.kind == Kind.ERROR
    assert "MPI rank 1 of 3 failed: builtins.ValueError: boom on rank 1" in frame.json()["message"]
    assert agent.wait() == 70  # ranks stuck in the collective: the worker exits for a restart
    assert any("ending this worker" in line for line in agent.stderr), agent.stderr


def test_ranks_fail_while_rank0_holds_the_gil_reported_once_then_worker_ends(agents):
    agent = agents(3)
    started = time.monotonic()
    frame, _ = agent.call(_ranks_fail_while_rank0_holds_the_gil)
    assert frame.kind == Kind.ERROR
    assert "MPI rank 1 of 3 failed: builtins.ValueError: boom on rank 1" in frame.json()["message"]
    error = cloudpickle.loads(bytes.fromhex(frame.json()["exception"]))
    assert isinstance(error, MPIRankError) and error.rank == 1
    rest = agent.proc.stdout.read()  # until the worker ends: no second report of the call
    assert Kind.ERROR not in [f.kind for f in _frames(rest)]
    assert agent.wait() != 0  # stuck ranks cannot be recovered: the worker exits for a restart
    assert any("ending the worker" in line for line in agent.stderr), agent.stderr
    assert time.monotonic() - started < 60


def _frames(data: bytes) -> list[Frame]:
    frames = []
    while len(data) >= HEADER.size:
        length, kind, task_id = parse_header(data[:HEADER.size])
        frames.append(Frame(kind, task_id, data[HEADER.size:HEADER.size + length]))
        data = data[HEADER.size + length:]
    return frames


def _chatty():
    import sys

    from prefect_azmanagers.mpi import comm

    rank = comm().Get_rank()
    print(f"hello from {rank}")
    print(f"warning from {rank}", file=sys.stderr)
    return rank


def test_output_of_every_rank_is_tagged(agents):
    agent = agents(3)
    frame, outputs = agent.call(_chatty)
    assert cloudpickle.loads(frame.body) == 0
    assert agent.shutdown() == 0
    lines = [json.loads(f.body)["line"] for f in outputs + agent.late_outputs] + agent.stderr
    for rank in range(3):
        assert f"[rank {rank}] hello from {rank}" in lines, lines
        assert f"[rank {rank}] warning from {rank}" in lines, lines


def test_launcher_quotes_flags_and_refuses_bad_input():
    assert launcher(4) == ["mpirun", "-n", "4", *DEFAULT_MPI_FLAGS.split()]
    assert launcher(2, "--mca btl self,vader -x 'A=b c'") == [
        "mpirun", "-n", "2", "--mca", "btl", "self,vader", "-x", "A=b c"]
    from prefect_azmanagers.exceptions import ConfigurationError
    with pytest.raises(ConfigurationError):
        launcher(0)
    with pytest.raises(ConfigurationError):
        launcher(2, "--oops 'unterminated")


class _Surfacing(RankedCall):
    """One attempt that fails on rank 2 only; rank 0 surfaces that failure itself."""

    def lead(self, ranks: RankZero | None) -> str:
        ranks.begin_attempt(None)
        try:
            ranks.wait_for_ranks()
        except MPIRankError as exc:
            return f"rank {exc.rank} failed: {exc.error_type}"
        return "no failure"

    def follow(self, announcement: None) -> None:
        from prefect_azmanagers.mpi import comm

        if comm().Get_rank() == 2:
            raise KeyError("only on rank 2")


def test_a_call_can_surface_other_ranks_failures_itself(agents):
    agent = agents(3)
    frame, _ = agent.call(_Surfacing())
    assert frame.kind == Kind.RESULT
    assert cloudpickle.loads(frame.body) == "rank 2 failed: builtins.KeyError"
    frame, _ = agent.call(_allreduce, 2)
    assert cloudpickle.loads(frame.body) == (3, 6)
    assert agent.shutdown() == 0


class _Attempts(RankedCall):
    """A ranked call made of `attempts` attempts announced by rank 0 as a task
    run's are: an attempt fails on the ranks listed for it in `failing`, after the attempt's
    collective or (`before_collective`) instead of it. Rank 0 returns what became of each."""

    def __init__(self, attempts: int, failing: dict[int, set[int]] | None = None,
                 before_collective: bool = False):
        self.attempts = attempts
        self.failing = failing or {}
        self.before_collective = before_collective

    def lead(self, ranks: RankZero | None) -> list[tuple]:
        results = []
        for number in range(1, self.attempts + 1):
            ranks.begin_attempt({"attempt": number})
            try:
                value = self._attempt(number)
            except ValueError as exc:
                ranks.own_failure_stands()
                results.append(("failed on rank 0", number, str(exc)))
                continue
            try:
                ranks.wait_for_ranks()
            except MPIRankError as exc:
                results.append(("failed on rank", number, exc.rank))
                continue
            results.append(("done", number, value))
        return results

    def follow(self, announcement: dict) -> None:
        self._attempt(announcement["attempt"])

    def _attempt(self, number: int) -> list[int]:
        from prefect_azmanagers.mpi import comm

        c = comm()
        print(f"attempt {number} on rank {c.Get_rank()}", file=sys.stderr, flush=True)
        fails = c.Get_rank() in self.failing.get(number, ())
        if fails and self.before_collective:
            raise ValueError(f"attempt {number} gave up on rank {c.Get_rank()}")
        seen = c.allgather(number)  # each rank is in the same attempt
        if fails:
            raise ValueError(f"attempt {number} failed on rank {c.Get_rank()}")
        return seen


def _attempt_lines(agent: AgentUnderMPI) -> list[str]:
    return sorted(line for line in agent.stderr if "] attempt " in line)


def test_ranks_run_each_announced_attempt_once_and_none_without_one(agents):
    agent = agents(3)
    frame, _ = agent.call(_Attempts(0), 1)  # e.g. a task run whose result is cached
    assert frame.kind == Kind.RESULT and cloudpickle.loads(frame.body) == []
    frame, _ = agent.call(_Attempts(2), 2)
    assert cloudpickle.loads(frame.body) == [("done", 1, [1, 1, 1]), ("done", 2, [2, 2, 2])]
    frame, _ = agent.call(_allreduce, 3)  # the call is over on every rank: a plain call follows
    assert cloudpickle.loads(frame.body) == (3, 6)
    assert agent.shutdown() == 0
    assert _attempt_lines(agent) == sorted(f"[rank {r}] attempt {n} on rank {r}"
                                           for r in range(3) for n in (1, 2))


def test_an_attempt_failing_on_any_rank_is_followed_by_the_next_on_every_rank(agents):
    agent = agents(3)
    frame, _ = agent.call(_Attempts(2, failing={1: {0}}), 1)
    assert cloudpickle.loads(frame.body) == [
        ("failed on rank 0", 1, "attempt 1 failed on rank 0"), ("done", 2, [2, 2, 2])]
    # a failed rank is released (settled) before the next attempt starts on it
    frame, _ = agent.call(_Attempts(3, failing={1: {2}, 2: {1, 2}}), 2)
    first, second, third = cloudpickle.loads(frame.body)
    assert first == ("failed on rank", 1, 2) and third == ("done", 3, [3, 3, 3])
    # both ranks fail attempt 2: the attempt reports whichever failure reaches rank 0 first
    assert second in {("failed on rank", 2, 1), ("failed on rank", 2, 2)}
    frame, _ = agent.call(_allreduce, 3)
    assert cloudpickle.loads(frame.body) == (3, 6)
    assert agent.shutdown() == 0


def test_an_attempt_stuck_after_rank0_failed_ends_the_call_and_the_worker(agents):
    agent = agents(3)
    frame, _ = agent.call(_Attempts(2, failing={1: {0}}, before_collective=True))
    assert frame.kind == Kind.ERROR  # ranks 1 and 2 wait in attempt 1's collective forever
    assert "MPI rank 1 of 3 failed: Stuck: rank 1 did not finish attempt 1" in frame.json()["message"]
    assert agent.wait() == 70
    assert "[rank 1] attempt 2 on rank 1" not in agent.stderr
