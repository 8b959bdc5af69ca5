"""Frame decoding limits: a reader refuses an over-size frame before holding its body."""

from __future__ import annotations

import pytest

from prefect_azmanagers.cluster.protocol import (
    HEADER,
    FrameDecoder,
    FrameTooLarge,
    Kind,
    ProtocolError,
    encode,
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
