"""The framed binary protocol between the driver and an agent (shared by both sides).

A frame is a fixed header `!QBQ` (body length, message kind, task id) followed by the body.
Task payloads and results travel as pickles, so a payload is pickled once on the driver and
never re-encoded; control messages carry small JSON bodies. A pickle body is either a plain
pickle (it starts with the PROTO opcode 0x80) or, when large buffers travel beside it
(`Payload`), the layout

    0x00, `!QI` (pickle length, buffer count), per buffer `!QB` (length, kind), pickle, buffers

so a 100 MB argument is written from the caller's own object and read into the object the
callee gets, never copied into or out of a pickle stream. The module imports only the
standard library: the agent loads it before anything else.
"""

from __future__ import annotations

import enum
import io
import json
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Union

from prefect_azmanagers.exceptions import ProtocolError

HEADER = struct.Struct("!QBQ")
MAX_BODY = 1 << 40  # refuses a corrupted length prefix instead of allocating it (the agent's
# bound; the driver reads with a much lower one, transport.MAX_FRAME)
LARGE_BODY = 1 << 20  # bodies still missing more than this are gathered chunk by chunk


class Kind(enum.IntEnum):
    # driver -> agent
    RUN = 1  # task id, body = cloudpickled zero-argument callable
    SHUTDOWN = 2  # run the flush hooks, answer BYE and exit
    # agent -> driver
    HELLO = 10  # JSON: pid, pgid, hostname, python, concurrency, versions (versions.local())
    RESULT = 11  # task id, body = cloudpickled return value
    ERROR = 12  # task id, JSON: type, message, traceback, exception (hex cloudpickle or null)
    OUTPUT = 13  # JSON: stream ("stdout" | "stderr"), line
    HEARTBEAT = 14  # JSON: running task count
    PREEMPT = 15  # JSON: event_id, not_before (the IMDS scheduled event's NotBefore text)
    BYE = 16  # the agent flushed and is about to exit


class FrameTooLarge(ProtocolError):
    """A frame's header announces a body over the reader's limit (refused before it arrives)."""

    def __init__(self, kind: "Kind", task_id: int, length: int, limit: int):
        super().__init__(f"a {kind.name} frame of {length} bytes is over the reader's limit of "
                         f"{limit} bytes")
        self.kind, self.task_id, self.length, self.limit = kind, task_id, length, limit


@dataclass(frozen=True)
class Frame:
    kind: Kind
    task_id: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class BufferKind(enum.IntEnum):
    """What an out-of-band buffer is rebuilt as (pickle-5 buffers, e.g. numpy arrays', as
    in-band: read-only ones as bytes, writable ones as bytearray)."""
    BYTES = 0
    BYTEARRAY = 1


_BUFFER_KINDS = frozenset(BufferKind)
PAYLOAD_MARKER = b"\x00"
PAYLOAD_HEAD = struct.Struct("!QI")
BUFFER_ENTRY = struct.Struct("!QB")
Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class Payload:
    """A pickle whose large buffers travel beside it, uncopied (see the module docstring).

    The pickle refers to buffer i by the persistent id `i`; `serialization.pickle_payload`
    makes one, `load_payload` rebuilds the object.
    """
    pickle: bytes
    buffers: tuple[Buffer, ...] = ()
    kinds: tuple[BufferKind, ...] = ()

    @property
    def nbytes(self) -> int:
        """The frame body length of this payload."""
        if not self.buffers:
            return len(self.pickle)
        return (1 + PAYLOAD_HEAD.size + len(self.buffers) * BUFFER_ENTRY.size + len(self.pickle)
                + sum(memoryview(b).nbytes for b in self.buffers))

    def prefix(self) -> bytes:
        """Everything before the buffers: the plain pickle alone when there are none."""
        if not self.buffers:
            return self.pickle
        table = b"".join(BUFFER_ENTRY.pack(memoryview(b).nbytes, k)
                         for b, k in zip(self.buffers, self.kinds))
        return (PAYLOAD_MARKER + PAYLOAD_HEAD.pack(len(self.pickle), len(self.buffers)) + table
                + self.pickle)

    @classmethod
    def parse(cls, body: Buffer) -> "Payload":
        """The payload in a received body (buffers are views of `body`)."""
        view = memoryview(body)
        if view[:1] != PAYLOAD_MARKER:
            return cls(bytes(body) if not isinstance(body, bytes) else body)
        try:
            size, count = PAYLOAD_HEAD.unpack_from(view, 1)
            offset = 1 + PAYLOAD_HEAD.size
            entries = [BUFFER_ENTRY.unpack_from(view, offset + i * BUFFER_ENTRY.size)
                       for i in range(count)]
            offset += count * BUFFER_ENTRY.size
            data = bytes(view[offset:offset + size])
            offset += size
            buffers, kinds = [], []
            for length, kind in entries:
                buffers.append(view[offset:offset + length])
                kinds.append(BufferKind(kind))
                offset += length
        except (struct.error, ValueError) as exc:
            raise ProtocolError(f"malformed payload: {exc}") from None
        if offset != len(view) or len(data) != size:
            raise ProtocolError(f"malformed payload: its table describes {offset} bytes, "
                                f"the body holds {len(view)}")
        return cls(data, tuple(buffers), tuple(kinds))

    @classmethod
    def read(cls, reader: io.BufferedReader, length: int) -> "Payload | None":
        """Read a `length`-byte body from a buffered binary stream, each out-of-band buffer
        straight into its own object; None at end of input."""
        if length == 0 or reader.peek(1)[:1] != PAYLOAD_MARKER:
            data = reader.read(length)
            return cls(data) if len(data) == length else None
        head = reader.read(1 + PAYLOAD_HEAD.size)
        if len(head) < 1 + PAYLOAD_HEAD.size:
            return None
        size, count = PAYLOAD_HEAD.unpack_from(head, 1)
        table = reader.read(count * BUFFER_ENTRY.size)
        if len(table) < count * BUFFER_ENTRY.size:
            return None
        entries = [BUFFER_ENTRY.unpack_from(table, i * BUFFER_ENTRY.size) for i in range(count)]
        if len(head) + len(table) + size + sum(n for n, _ in entries) != length or any(
                kind not in _BUFFER_KINDS for _, kind in entries):
            raise ProtocolError("malformed payload: its buffer table does not match the frame "
                                "(lengths or buffer kinds)")
        data = reader.read(size)
        if len(data) < size:
            return None
        buffers: list[Buffer] = []
        for length, kind in entries:
            if kind == BufferKind.BYTES:
                buffer: Buffer = reader.read(length)
                got = len(buffer)
            else:
                buffer = bytearray(length)
                got = reader.readinto(buffer)
            if got < length:
                return None
            buffers.append(buffer)
        return cls(data, tuple(buffers), tuple(BufferKind(k) for _, k in entries))


class _PayloadUnpickler(pickle.Unpickler):
    def __init__(self, payload: Payload):
        super().__init__(io.BytesIO(payload.pickle))
        self._payload = payload
        self._rebuilt: dict[int, Any] = {}  # one object per buffer, however often referred to

    def persistent_load(self, pid: Any) -> Any:
        if pid in self._rebuilt:
            return self._rebuilt[pid]
        try:
            buffer, kind = self._payload.buffers[pid], self._payload.kinds[pid]
        except (IndexError, TypeError):
            raise pickle.UnpicklingError(f"the pickle refers to a missing buffer {pid!r}") from None
        wanted = bytes if kind == BufferKind.BYTES else bytearray
        value = self._rebuilt[pid] = buffer if type(buffer) is wanted else wanted(buffer)
        return value


def load_payload(payload: "Payload | Buffer") -> Any:
    """Unpickle a payload (or a received pickle body in either layout)."""
    if not isinstance(payload, Payload):
        payload = Payload.parse(payload)
    if not payload.buffers:
        return pickle.loads(payload.pickle)
    return _PayloadUnpickler(payload).load()


def encode(kind: Kind, task_id: int = 0, body: bytes = b"") -> bytes:
    """One frame as bytes (header + body)."""
    return HEADER.pack(len(body), kind, task_id) + body


def encode_json(kind: Kind, obj: Any, task_id: int = 0) -> bytes:
    return encode(kind, task_id, json.dumps(obj, separators=(",", ":")).encode())


def parse_header(header: bytes, max_body: int = MAX_BODY) -> tuple[int, Kind, int]:
    """(body length, kind, task id) from a header; ProtocolError if it cannot be one,
    FrameTooLarge if its body is over `max_body` bytes."""
    length, code, task_id = HEADER.unpack(header)
    if length > MAX_BODY:
        raise ProtocolError(f"frame length {length} is not plausible: the stream is corrupted")
    try:
        kind = Kind(code)
    except ValueError:
        raise ProtocolError(f"unknown message kind {code}: the stream is corrupted") from None
    if length > max_body:
        raise FrameTooLarge(kind, task_id, length, max_body)
    return length, kind, task_id


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get complete frames back.

    A large body is gathered as the chunks that arrived and joined once, so it is copied once
    (growing one buffer and slicing it out would copy it several times). A header announcing
    more than `max_body` bytes raises FrameTooLarge before any of its body is held, so a
    misbehaving writer cannot make the reader allocate without bound.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._buffer = bytearray()  # bytes not yet part of a body being gathered
        self._header: tuple[int, Kind, int] | None = None
        self._chunks: list[Buffer] = []  # the body being gathered, when it spans feeds
        self._missing = 0

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        if self._chunks:
            if len(data) < self._missing:
                self._chunks.append(data)
                self._missing -= len(data)
                return frames
            view = memoryview(data)
            self._chunks.append(view[:self._missing])
            data = view[self._missing:]
            frames.append(self._complete(b"".join(self._chunks)))
            self._chunks = []
        self._buffer += data
        while True:
            if self._header is None:
                if len(self._buffer) < HEADER.size:
                    return frames
                self._header = parse_header(bytes(self._buffer[: HEADER.size]), self.max_body)
                del self._buffer[: HEADER.size]
            length = self._header[0]
            if len(self._buffer) < length:
                if length - len(self._buffer) > LARGE_BODY:  # gather the rest as it comes
                    self._chunks = [bytes(self._buffer)]
                    self._missing = length - len(self._buffer)
                    self._buffer.clear()
                return frames
            body = bytes(self._buffer[:length])
            del self._buffer[:length]
            frames.append(self._complete(body))

    def _complete(self, body: bytes) -> Frame:
        assert self._header is not None
        _, kind, task_id = self._header
        self._header = None
        return Frame(kind, task_id, body)
