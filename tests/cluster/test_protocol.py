"""Frame decoding limits: a reader refuses an over-size frame before holding its body."""

from __future__ import annotations

import io
import os
import pickle
from unittest import mock

import cloudpickle
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefect_azmanagers.cluster import protocol, serialization
from prefect_azmanagers.cluster.protocol import (
    HEADER,
    BufferKind,
    FrameDecoder,
    FrameTooLarge,
    Kind,
    Payload,
    ProtocolError,
    encode,
    load_payload,
)


def test_a_frame_over_the_limit_is_refused_from_its_header():
    decoder = FrameDecoder(max_body=1024)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(HEADER.pack(1025, Kind.RESULT, 7))  # no body byte has arrived yet
    assert isinstance(info.value, ProtocolError)
    assert (info.value.kind, info.value.task_id, info.value.length, info.value.limit) == (
        Kind.RESULT, 7, 1025, 1024)
    assert "RESULT frame of 1025 bytes is over the reader's limit of 1024 bytes" in str(info.value)


def test_frames_up_to_the_limit_pass():
    decoder = FrameDecoder(max_body=1024)
    frames = decoder.feed(encode(Kind.RESULT, 1, b"a" * 1024) + encode(Kind.BYE))
    assert [(f.kind, len(f.body)) for f in frames] == [(Kind.RESULT, 1024), (Kind.BYE, 0)]


def test_a_corrupted_kind_is_reported_as_such_whatever_the_length():
    with pytest.raises(ProtocolError, match="unknown message kind 99"):
        FrameDecoder(max_body=10).feed(HEADER.pack(1 << 30, 99, 0))


@given(st.lists(st.tuples(st.sampled_from(list(Kind)), st.integers(0, 2**63), st.binary(max_size=300)),
                max_size=8),
       st.integers(1, 50))
def test_frames_survive_any_chunking(frames, chunk):
    stream = b"".join(encode(k, t, b) for k, t, b in frames)
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += decoder.feed(stream[i:i + chunk])
    assert [(f.kind, f.task_id, f.body) for f in got] == frames


def _stream_of(frames):
    return b"".join(encode(k, t, b) for k, t, b in frames)


@given(st.lists(st.tuples(st.sampled_from(list(Kind)), st.integers(0, 2**63), st.binary(max_size=300)),
                max_size=8),
       st.lists(st.integers(1, 120), min_size=1, max_size=40))
def test_gathered_bodies_survive_any_chunking(frames, cuts):
    stream = _stream_of(frames)
    decoder = FrameDecoder()
    got, start, i = [], 0, 0
    with mock.patch.object(protocol, "LARGE_BODY", 16):  # most bodies are gathered chunk-wise
        while start < len(stream):
            step = cuts[i % len(cuts)]
            got += decoder.feed(stream[start:start + step])
            start, i = start + step, i + 1
    assert [(f.kind, f.task_id, f.body) for f in got] == frames
    assert all(type(f.body) is bytes for f in got)


def test_corrupted_stream_is_refused():
    with pytest.raises(ProtocolError, match="unknown message kind"):
        FrameDecoder().feed(HEADER.pack(0, 99, 0))
    with pytest.raises(ProtocolError, match="not plausible"):
        FrameDecoder().feed(HEADER.pack(1 << 50, Kind.RUN, 0))


@pytest.mark.parametrize("chunk", [7, 4093, 65536, (1 << 20) + 7, 1 << 30])
def test_large_bodies_split_across_reads(chunk):
    big = os.urandom(3 << 20)  # gathered chunk by chunk (more than LARGE_BODY missing)
    frames = [(Kind.HELLO, 0, b"{}"), (Kind.RESULT, 7, big), (Kind.OUTPUT, 0, b"x"),
              (Kind.RESULT, 8, big[:70000]), (Kind.BYE, 0, b"")]
    stream = _stream_of(frames)
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += decoder.feed(stream[i:i + chunk])
    assert [(f.kind, f.task_id, f.body) for f in got] == frames
    assert all(type(f.body) is bytes for f in got)


class _Viewed:
    """Pickles its data as a pickle-5 buffer, as numpy arrays do."""

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return _Viewed, (pickle.PickleBuffer(self.data),)


def _wire(payload: Payload) -> bytes:
    return payload.prefix() + b"".join(bytes(memoryview(b)) for b in payload.buffers)


def test_payload_keeps_large_buffers_out_of_the_pickle():
    big, mutable = os.urandom(1 << 20), bytearray(os.urandom(1 << 17))
    value = {"a": big, "again": big, "b": mutable, "small": b"s" * 100,
             "ro": _Viewed(os.urandom(1 << 17)), "rw": _Viewed(bytearray(1 << 17))}
    payload = serialization.dumps_payload(value)
    assert len(payload.pickle) < 4096  # nothing large was copied into the stream
    assert payload.buffers[0] is big and len(payload.buffers) == 4  # `big` travels once
    assert payload.kinds == (BufferKind.BYTES, BufferKind.BYTEARRAY, BufferKind.BYTES,
                             BufferKind.BYTEARRAY)
    body = _wire(payload)
    assert body[:1] == b"\x00" and len(body) == payload.nbytes

    in_process = load_payload(payload)
    assert in_process["a"] is big and in_process["again"] is big  # no copy at all
    received = serialization.loads(body)  # as the driver gets a RESULT body
    for got in (in_process, received):
        assert got["a"] == big and got["again"] is got["a"] and got["small"] == b"s" * 100
        assert type(got["b"]) is bytearray and got["b"] == mutable
        assert type(got["ro"].data) is bytes and got["ro"].data == value["ro"].data
        assert type(got["rw"].data) is bytearray and got["rw"].data == value["rw"].data


def test_payload_without_large_buffers_is_a_plain_pickle():
    payload = serialization.dumps_payload({"x": b"y" * 1000})
    assert payload.buffers == () and payload.prefix() == payload.pickle
    assert payload.pickle[:1] == b"\x80" and payload.nbytes == len(payload.pickle)
    assert cloudpickle.loads(_wire(payload)) == {"x": b"y" * 1000}  # readers of plain pickles
    assert serialization.loads(serialization.dumps([1, 2])) == [1, 2]


def test_payload_read_from_a_stream_fills_one_object_per_buffer():
    big, mutable = os.urandom(1 << 20), bytearray(os.urandom(1 << 17))
    payload = serialization.dumps_payload((big, mutable))
    body = _wire(payload)
    stream = io.BufferedReader(io.BytesIO(body + b"next frame"), buffer_size=4096)
    read = Payload.read(stream, len(body))
    assert read is not None and [type(b) for b in read.buffers] == [bytes, bytearray]
    got = load_payload(read)
    assert got == (big, mutable) and got[0] is read.buffers[0]  # rebuilt without a copy
    assert stream.read() == b"next frame"
    plain = serialization.dumps_payload("plain")
    assert Payload.read(io.BufferedReader(io.BytesIO(plain.pickle)), plain.nbytes) == plain

    truncated = io.BufferedReader(io.BytesIO(body[:-10]))
    assert Payload.read(truncated, len(body)) is None  # end of input inside the frame
    with pytest.raises(ProtocolError, match="does not match the frame"):
        Payload.read(io.BufferedReader(io.BytesIO(body)), len(body) + 1)


def test_a_payload_inside_a_payload_travels_without_copies():
    blob, rw = os.urandom(1 << 20), _Viewed(bytearray(os.urandom(1 << 17)))
    inner = serialization.dumps_payload({"blob": blob, "rw": rw})  # e.g. one task parameter
    outer = serialization.dumps_payload({"parameter": inner})
    assert len(outer.pickle) < 4096 and len(outer.buffers) == 2
    body = _wire(outer)
    read = Payload.read(io.BufferedReader(io.BytesIO(body)), len(body))
    got = serialization.loads(serialization.loads(read)["parameter"])
    assert got["blob"] == blob and got["blob"] is read.buffers[0]
    assert got["rw"].data == rw.data and got["rw"].data is read.buffers[1]


def test_malformed_payloads_are_refused():
    body = _wire(serialization.dumps_payload(os.urandom(1 << 17)))
    with pytest.raises(ProtocolError, match="malformed payload"):
        Payload.parse(body[:-1])
    with pytest.raises(ProtocolError, match="malformed payload"):
        Payload.parse(b"\x00\x01")
    stream = io.BytesIO()
    pickler = pickle.Pickler(stream)
    pickler.persistent_id = lambda obj: 5 if obj == "ref" else None  # there is no buffer 5
    pickler.dump(["ref"])
    with pytest.raises(pickle.UnpicklingError, match="missing buffer 5"):
        load_payload(Payload(stream.getvalue(), (b"x",), (BufferKind.BYTES,)))
