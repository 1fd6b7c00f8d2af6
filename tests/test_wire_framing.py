"""Framing: explicit maximum size, incremental decoding, good frames before a bad one."""

from __future__ import annotations

import pytest

from lmcache_rs.wire import FrameDecoder, FrameError, encode_frame, pack_u32s, pack_u64s, unpack_u32s, unpack_u64s
from lmcache_rs.wire.framing import _HEADER


def test_roundtrip_split_anywhere():
    msgs = [{"t": "a", "x": 1}, {"t": "b", "h": pack_u64s([1, 2**64 - 1])}, {"t": "c", "nested": {"k": [1, 2]}}]
    data = b"".join(encode_frame(m) for m in msgs)
    for cut in range(len(data) + 1):
        d = FrameDecoder()
        assert d.feed(data[:cut]) + d.feed(data[cut:]) == msgs
        assert d.buffered == 0


def test_limit_is_checked_from_the_header_alone():
    d = FrameDecoder(max_frame_bytes=10)
    assert d.feed(encode_frame({"t": "ok"})) == [{"t": "ok"}]  # 5 bytes of body
    with pytest.raises(FrameError) as e:
        d.feed(_HEADER.pack(11))
    assert e.value.code == "frame_too_large"
    with pytest.raises(ValueError):
        FrameDecoder(0)


def test_frames_before_a_bad_one_are_yielded_first():
    d = FrameDecoder()
    data = encode_frame({"t": "one"}) + encode_frame({"t": "two"}) + _HEADER.pack(2) + b"\xc1\xc1" + encode_frame({"t": "x"})
    seen = []
    with pytest.raises(FrameError) as e:
        for m in d.frames(data):
            seen.append(m)
    assert seen == [{"t": "one"}, {"t": "two"}] and e.value.code == "bad_msgpack"
    with pytest.raises(FrameError):  # feed() is all or nothing
        FrameDecoder().feed(data)


@pytest.mark.parametrize("body, code", [
    (b"\x01", "bad_frame"), (b"\x91\x01", "bad_frame"), (b"\x81\xa1t\x01", "bad_frame"),
    (b"\x81\x01\x01", "bad_msgpack"),  # integer map key refused (strict_map_key)
    (b"\xc1", "bad_msgpack"),
])
def test_bad_bodies(body, code):
    with pytest.raises(FrameError) as e:
        FrameDecoder().feed(_HEADER.pack(len(body)) + body)
    assert e.value.code == code


def test_packed_integers():
    assert list(unpack_u64s(pack_u64s([0, 1, 2**63, 2**64 - 1]))) == [0, 1, 2**63, 2**64 - 1]
    assert list(unpack_u32s(pack_u32s([0, 2**32 - 1]))) == [0, 2**32 - 1]
    assert pack_u64s([1]) == b"\x01" + b"\x00" * 7
    with pytest.raises(FrameError):
        unpack_u64s(b"\x00" * 7)
    with pytest.raises(FrameError):
        unpack_u32s(b"\x00" * 5)
