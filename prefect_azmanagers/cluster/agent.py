"""The worker agent: `python -m prefect_azmanagers.cluster.agent`, one process per worker slot.

Started by the driver over SSH, it lives as long as the slot: it reads RUN frames on stdin,
runs each cloudpickled callable in a thread pool of `--concurrency` threads and answers RESULT
or ERROR (with the remote traceback). The protocol keeps the original stdin/stdout on
duplicated descriptors; fd 0 becomes /dev/null and fd 1 a pipe whose lines are forwarded as
OUTPUT frames, so a task's `print()` (or a child process writing to fd 1) cannot corrupt the
stream. fd 2 stays the SSH channel's stderr, which the driver reads line by line (it also
carries the agent's own crash output). On spot instances (`--imds URL`) it polls the IMDS
scheduled events once a second and reports a Preempt naming its VM.

The agent's own imports stay light (stdlib + cloudpickle). Before it says HELLO it runs the
cluster's `warm_up`, if any (`--warm-up MODULE:FUNCTION`; clusters default to
`prefect_azmanagers._remote_task:warm_up`, which imports Prefect's task engine and builds its
models), so a slot joins ready and the first task it runs pays nothing the later ones do not.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import socket
import sys
import threading
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Callable

import cloudpickle

from prefect_azmanagers.cluster import versions
from prefect_azmanagers.cluster.mpi.leader import leader_or_follow
from prefect_azmanagers.cluster.protocol import (
    HEADER,
    Buffer,
    Kind,
    Payload,
    encode,
    encode_json,
    load_payload,
    parse_header,
)
from prefect_azmanagers.cluster.serialization import pickle_payload

_flush_hooks: list[Callable[[], None]] = []


def register_flush_hook(hook: Callable[[], None]) -> None:
    """Run `hook` when the agent shuts down (e.g. drain buffered logs/events to an API).

    Callables running on a worker import this module to register once per process.
    """
    if hook not in _flush_hooks:
        _flush_hooks.append(hook)


def run_flush_hooks() -> None:
    """Run the registered hooks; the agent does at shutdown, MPI ranks > 0 before they exit."""
    for hook in list(_flush_hooks):
        try:
            hook()
        except Exception:
            traceback.print_exc()


class _Channel:
    """The protocol side of the agent: framed writes (thread-safe) and reads."""

    def __init__(self, reader: io.BufferedReader, writer: BinaryIO):
        self._reader = reader
        self._writer = writer
        self._lock = threading.Lock()

    def send(self, frame: bytes, *more: Buffer) -> None:
        """Write a frame, given whole or as pieces (written as they are: large ones uncopied)."""
        with self._lock:
            self._writer.write(frame)
            for piece in more:
                self._writer.write(piece)
            self._writer.flush()

    def send_payload(self, kind: Kind, task_id: int, payload: Payload) -> None:
        self.send(HEADER.pack(payload.nbytes, kind, task_id), payload.prefix(), *payload.buffers)

    def receive(self) -> tuple[Kind, int, bytes | Payload] | None:
        """The next frame; a RUN body as its pickle, or as a Payload when buffers travel beside
        it (read straight into the objects the call gets). None at end of input."""
        header = self._reader.read(HEADER.size)
        if len(header) < HEADER.size:
            return None  # the driver closed our stdin
        length, kind, task_id = parse_header(header)
        if kind == Kind.RUN:
            payload = Payload.read(self._reader, length)
            if payload is None:
                return None
            return kind, task_id, payload if payload.buffers else payload.pickle
        body = self._reader.read(length)
        if len(body) < length:
            return None
        return kind, task_id, body


def _take_over_stdio() -> tuple[io.BufferedReader, BinaryIO, int]:
    """Move the protocol to private descriptors; return (reader, writer, stdout pipe read end)."""
    reader = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    writer = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    return reader, writer, read_end


def _forward_stdout(channel: _Channel, read_end: int) -> None:
    with os.fdopen(read_end, "rb") as pipe:
        for raw in pipe:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            channel.send(encode_json(Kind.OUTPUT, {"stream": "stdout", "line": line}))


def _error_body(exc: BaseException, tb_text: str) -> dict[str, Any]:
    try:
        pickled: str | None = cloudpickle.dumps(exc).hex()
    except Exception:
        pickled = None
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": tb_text,
        "exception": pickled,
    }


def _run_pickled(task_id: int, payload: bytes | Payload) -> Any:
    return load_payload(payload)()


class Agent:
    def __init__(self, channel: _Channel, concurrency: int, *,
                 execute: Callable[[int, bytes | Payload], Any] = _run_pickled,
                 after_call: Callable[[], None] | None = None):
        # execute/after_call: the MPI seam (cluster/mpi/leader.py runs each call on every rank)
        self.execute = execute
        self.after_call = after_call
        self.channel = channel
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="azm-task")
        self.concurrency = concurrency
        self.running = 0
        self._running_lock = threading.Lock()

    def hello(self, warm_up_seconds: float = 0.0) -> None:
        self.channel.send(encode_json(Kind.HELLO, {
            "pid": os.getpid(), "pgid": os.getpgid(0), "hostname": socket.gethostname(),
            "python": sys.version.split()[0], "concurrency": self.concurrency,
            "versions": versions.local(),  # the driver refuses incompatible ones (versions.check)
            "warm_up_s": round(warm_up_seconds, 3),
        }))

    def run_task(self, task_id: int, payload: bytes | Payload) -> None:
        with self._running_lock:
            self.running += 1
        try:
            try:
                value = self.execute(task_id, payload)
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the driver
                self.channel.send(encode_json(Kind.ERROR, _error_body(exc, traceback.format_exc()), task_id))
                return
            try:
                data = pickle_payload(value)
            except Exception as exc:
                body = _error_body(exc, traceback.format_exc())
                body["type"] = "prefect_azmanagers.exceptions.PayloadError"
                body["message"] = (f"the return value ({type(value).__qualname__}) cannot be "
                                   f"pickled to send it back: {exc}")
                body["exception"] = None
                self.channel.send(encode_json(Kind.ERROR, body, task_id))
                return
            self.channel.send_payload(Kind.RESULT, task_id, data)
        finally:
            with self._running_lock:
                self.running -= 1
            if self.after_call is not None:
                self.after_call()

    def heartbeat(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.channel.send(encode_json(Kind.HEARTBEAT, {"running": self.running}))

    def serve(self) -> bool:
        """Read frames until SHUTDOWN (True) or end of input (False: the driver is gone)."""
        while True:
            message = self.channel.receive()
            if message is None:
                return False
            kind, task_id, body = message
            if kind == Kind.SHUTDOWN:
                return True
            if kind == Kind.RUN:
                self.pool.submit(self.run_task, task_id, body)


IMDS_URL_VARIABLE = "AZMANAGERS_IMDS_URL"  # docs/architecture.md, "Inside an instance"
_imds_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # IMDS never via a proxy


def _imds_get(base_url: str, path: str) -> Any:
    request = urllib.request.Request(base_url.rstrip("/") + path, headers={"Metadata": "true"})
    with _imds_opener.open(request, timeout=5) as response:
        return json.load(response)


def watch_scheduled_events(channel: _Channel, base_url: str, interval: float = 1.0) -> None:
    """Poll IMDS scheduled events and report each Preempt event naming this VM once."""
    vm_name = None
    reported: set[str] = set()
    last_complaint = float("-inf")
    while True:
        try:
            if vm_name is None:
                vm_name = _imds_get(base_url, "/metadata/instance?api-version=2021-02-01")["compute"]["name"]
            document = _imds_get(base_url, "/metadata/scheduledevents?api-version=2020-07-01")
            for event in document.get("Events", []):
                event_id = event.get("EventId", "")
                if (event.get("EventType") == "Preempt" and vm_name in event.get("Resources", [])
                        and event_id not in reported):
                    reported.add(event_id)
                    channel.send(encode_json(Kind.PREEMPT, {
                        "event_id": event_id, "not_before": event.get("NotBefore", ""),
                    }))
        except Exception as exc:  # IMDS briefly unreachable: keep polling, say why once a minute
            if time.monotonic() - last_complaint > 60:
                last_complaint = time.monotonic()
                print(f"azmanagers agent: IMDS poll failed: {exc}", file=sys.stderr)
        time.sleep(interval)


def warm_up(spec: str) -> float:
    """Import MODULE and call FUNCTION() of `spec` ("MODULE:FUNCTION", or "none"); returns the
    seconds it took. Runs before HELLO, while fd 1 may still be the protocol's stdout, so
    whatever it prints goes to stderr. A failing warm-up is reported on stderr and the agent
    goes on: the task that needs what failed says why when it runs."""
    if spec == "none":
        return 0.0
    t0 = time.perf_counter()
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            module, _, function = spec.partition(":")
            getattr(importlib.import_module(module), function)()
    except Exception:
        print(f"azmanagers agent: warm-up {spec} failed (the slot joins cold):", file=sys.stderr)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    return time.perf_counter() - t0


def _start_daemon(target: Callable[..., None], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def _finish_stdout(forwarder: threading.Thread) -> None:
    """Forward what tasks printed last: close our end of the stdout pipe, let the reader drain."""
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    forwarder.join(timeout=2.0)  # a child process still holding the pipe must not stall exit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prefect_azmanagers.cluster.agent")
    parser.add_argument("--concurrency", type=int, default=1, help="tasks run at once by this slot")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    parser.add_argument("--warm-up", default="none", metavar="MODULE:FUNCTION",
                        help="called before HELLO to make the slot ready for its first task "
                             "(the cluster's warm_up option; default: none)")
    parser.add_argument("--imds", default=None,
                        help="IMDS base URL to poll for Preempt events (spot instances); "
                             f"${IMDS_URL_VARIABLE}, when set on the instance, wins")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.warm_up != "none" and ":" not in args.warm_up:
        parser.error(f"--warm-up takes MODULE:FUNCTION or none, got {args.warm_up!r}")

    warm_up_seconds = warm_up(args.warm_up)  # on every MPI rank: ranks > 0 run tasks too
    leader = leader_or_follow(args.concurrency, run_flush_hooks)  # ranks > 0 stay inside
    reader, writer, stdout_pipe = _take_over_stdio()
    if leader is not None:
        leader.tag_output()
        register_flush_hook(leader.stop_followers)
    channel = _Channel(reader, writer)
    agent = Agent(channel, args.concurrency, **({"execute": leader.execute,
                                                 "after_call": leader.after_call} if leader else {}))
    agent.hello(warm_up_seconds)
    forwarder = _start_daemon(_forward_stdout, channel, stdout_pipe)
    _start_daemon(agent.heartbeat, args.heartbeat)
    if args.imds:
        # the instance may say where its IMDS is (the local cloud's loopback mode does)
        _start_daemon(watch_scheduled_events, channel, os.environ.get(IMDS_URL_VARIABLE) or args.imds)
    asked_to_stop = agent.serve()
    run_flush_hooks()
    _finish_stdout(forwarder)
    if asked_to_stop:
        channel.send(encode(Kind.BYE))
    sys.stderr.flush()
    # Task threads may still run (or user code left non-daemon threads): leave without joining.
    os._exit(0)


if __name__ == "__main__":
    # Run the canonical module, not `__main__`, so flush hooks registered by callables that
    # import `prefect_azmanagers.cluster.agent` land in the registry this process reads.
    from prefect_azmanagers.cluster import agent as _canonical

    _canonical.main()
