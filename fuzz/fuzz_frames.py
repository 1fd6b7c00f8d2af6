#!/usr/bin/env python3
"""Fuzz target ``frames``: the wire layer's FrameDecoder and packed-integer helpers on any bytes.

Checked for every input:

* ``FrameDecoder`` yields maps with a string ``"t"`` or raises FrameError, nothing else;
* the same stream cut into reads anywhere gives the same messages and the same error
  (incremental decoding is exact);
* the decoder never buffers more than one frame header + ``max_frame_bytes`` of body;
* a decoded message re-encodes to a frame that decodes and re-encodes to the same bytes;
* ``unpack_u64s`` / ``unpack_u32s`` take any multiple of the width and refuse the rest
  with FrameError; packing what was unpacked gives the same bytes back.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402,F401  (puts python/ on sys.path)

if __name__ == "__main__":  # under the fuzzer: instrument our modules before anything imports them
    import atheris

    with atheris.instrument_imports(include=["lmcache_rs.wire"]):
        import lmcache_rs.wire  # noqa: F401

from lmcache_rs.wire import (FrameDecoder, FrameError, encode_frame, pack_u32s, pack_u64s, unpack_u32s,
                             unpack_u64s)

MAX_FRAME = 512


def decode_all(stream: bytes, cuts: list[int]) -> tuple[list, str | None, int]:
    decoder = FrameDecoder(MAX_FRAME)
    out: list = []
    last = 0
    try:
        for cut in cuts + [len(stream)]:
            for m in decoder.frames(stream[last:cut]):
                out.append(m)
            if decoder.buffered > MAX_FRAME + 4:
                raise harness.Finding(f"decoder buffered {decoder.buffered} bytes with a {MAX_FRAME}-byte limit")
            last = cut
    except FrameError as exc:
        return out, exc.code, decoder.buffered
    return out, None, decoder.buffered


def test_one_input(data: bytes) -> None:
    if not data:
        return
    stream = data[1:]
    n = data[0] & 15
    cuts = sorted({(data[0] * 31 + i * 7919 + (stream[i % len(stream)] if stream else 0)) % (len(stream) + 1)
                   for i in range(n)})
    whole, whole_err, _ = decode_all(stream, [])
    parts, parts_err, _ = decode_all(stream, cuts)
    # compared as encoded bytes: a decoded NaN is not equal to itself
    if ([encode_frame(m) for m in whole], whole_err) != ([encode_frame(m) for m in parts], parts_err):
        raise harness.Finding(f"cutting the stream at {cuts} changed the result: {whole_err} vs {parts_err}")
    for m in whole:
        if not isinstance(m, dict) or not isinstance(m.get("t"), str):
            raise harness.Finding(f"decoder yielded {m!r:.200}")
        frame = encode_frame(m)
        (again,) = FrameDecoder(1 << 20).feed(frame)
        if encode_frame(again) != frame:  # compared as bytes: NaN != NaN
            raise harness.Finding(f"re-encoding changed {m!r:.200}")
    for unpack, pack, width in ((unpack_u64s, pack_u64s, 8), (unpack_u32s, pack_u32s, 4)):
        try:
            values = unpack(stream)
        except FrameError:
            if len(stream) % width == 0:
                raise harness.Finding(f"{unpack.__name__} refused {len(stream)} bytes") from None
        else:
            if len(stream) % width:
                raise harness.Finding(f"{unpack.__name__} took {len(stream)} bytes")
            if pack(values) != stream:
                raise harness.Finding(f"{pack.__name__}({unpack.__name__}(b)) != b")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
