"""The framed binary protocol between the driver and an agent (shared by both sides).

A frame is a fixed header `!QBQ` (body length, message kind, task id) followed by the body.
Task payloads and results travel as opaque cloudpickle bytes, so a payload is pickled once on
the driver and never re-encoded; control messages carry small JSON bodies. The module imports
only the standard library: the agent loads it before anything else.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct("!QBQ")
MAX_BODY = 1 << 40  # refuses a corrupted length prefix instead of allocating it


class Kind(enum.IntEnum):
    # driver -> agent
    RUN = 1  # task id, body = cloudpickled zero-argument callable
    SHUTDOWN = 2  # run the flush hooks, answer BYE and exit
    # agent -> driver
    HELLO = 10  # JSON: pid, pgid, hostname, python, concurrency
    RESULT = 11  # task id, body = cloudpickled return value
    ERROR = 12  # task id, JSON: type, message, traceback, exception (hex cloudpickle or null)
    OUTPUT = 13  # JSON: stream ("stdout" | "stderr"), line
    HEARTBEAT = 14  # JSON: running task count
    PREEMPT = 15  # JSON: event_id, not_before (the IMDS scheduled event's NotBefore text)
    BYE = 16  # the agent flushed and is about to exit


class ProtocolError(Exception):
    """The byte stream is not a sequence of valid frames (corruption or a foreign writer)."""


@dataclass(frozen=True)
class Frame:
    kind: Kind
    task_id: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def encode(kind: Kind, task_id: int = 0, body: bytes = b"") -> bytes:
    """One frame as bytes (header + body)."""
    return HEADER.pack(len(body), kind, task_id) + body


def encode_json(kind: Kind, obj: Any, task_id: int = 0) -> bytes:
    return encode(kind, task_id, json.dumps(obj, separators=(",", ":")).encode())


def parse_header(header: bytes) -> tuple[int, Kind, int]:
    """(body length, kind, task id) from a header; ProtocolError if it cannot be one."""
    length, kind, task_id = HEADER.unpack(header)
    if length > MAX_BODY:
        raise ProtocolError(f"frame length {length} is not plausible: the stream is corrupted")
    try:
        return length, Kind(kind), task_id
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}: the stream is corrupted") from None


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get complete frames back."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: tuple[int, Kind, int] | None = None

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            if self._header is None:
                if len(self._buffer) < HEADER.size:
                    return frames
                self._header = parse_header(bytes(self._buffer[: HEADER.size]))
                del self._buffer[: HEADER.size]
            length, kind, task_id = self._header
            if len(self._buffer) < length:
                return frames
            body = bytes(self._buffer[:length])
            del self._buffer[:length]
            self._header = None
            frames.append(Frame(kind, task_id, body))
