"""Framing layer: a 4-byte big-endian length, then a msgpack map with a "t" key.

The decoder is incremental (feed it whatever bytes arrived) and checks the declared
length against an explicit maximum before buffering the body, so a hostile length
never makes the receiver allocate.
"""

from __future__ import annotations

import array
import struct
import sys
from typing import Any, Iterable, Iterator

import msgpack

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")


# How an HTTP response or request begins: read as a frame header, an absurd length.
HTTP_STARTS = frozenset({b"HTTP", b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC"})


class FrameError(ValueError):
    """A frame that cannot be accepted; ``code`` goes into the error frame sent back."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def encode_frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into messages; raises FrameError on the first bad frame."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        if max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame being read

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """All complete messages in the stream so far; raises FrameError at the first bad one
        (the good frames before it are lost: use :meth:`frames` to act on them)."""
        return list(self.frames(data))

    def frames(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Like :meth:`feed`, one message at a time: the frames before a bad one are
        yielded before FrameError is raised. Consume the iterator fully before feeding again."""
        buf = self._buf
        buf += data
        pos = 0
        try:
            while True:
                if self._need is None:
                    if len(buf) - pos < _HEADER.size:
                        return
                    (length,) = _HEADER.unpack_from(buf, pos)
                    if length > self.max_frame_bytes:
                        head = bytes(buf[pos:pos + _HEADER.size])
                        if head in HTTP_STARTS:
                            raise FrameError(
                                "http_peer",
                                f"the peer speaks HTTP ({head.decode()!r}...), not lmcache_rs's worker protocol: "
                                "a worker's controller_pull_url names the controller's --monitor-port, "
                                "not its HTTP --port",
                            )
                        raise FrameError(
                            "frame_too_large",
                            f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes}",
                        )
                    pos += _HEADER.size
                    self._need = length
                if len(buf) - pos < self._need:
                    return
                end = pos + self._need
                body = bytes(buf[pos:end])
                pos = end
                self._need = None
                yield decode_body(body)
        finally:
            if pos:
                del buf[:pos]


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError("bad_msgpack", f"frame body is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise FrameError("bad_frame", f"frame body must be a map, got {type(message).__name__}")
    kind = message.get("t")
    if not isinstance(kind, str):
        raise FrameError("bad_frame", 'frame body has no string "t" (message type)')
    return message


# Keys and tokens travel as packed little-endian integers (docs/protocol.md).
_LITTLE = sys.byteorder == "little"


def _pack(code: str, values: Iterable[int]) -> bytes:
    arr = array.array(code, values)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _unpack(code: str, data: bytes, width: int, what: str) -> array.array:
    if len(data) % width:
        raise FrameError("bad_field", f"{what} must be a multiple of {width} bytes, got {len(data)}")
    arr = array.array(code)
    arr.frombytes(data)
    if not _LITTLE:
        arr.byteswap()
    return arr


def pack_u64s(values: Iterable[int]) -> bytes:
    return _pack("Q", values)


def pack_u32s(values: Iterable[int]) -> bytes:
    return _pack("I", values)


def unpack_u64s(data: bytes) -> array.array:
    return _unpack("Q", data, 8, "hashes")


def unpack_u32s(data: bytes) -> array.array:
    return _unpack("I", data, 4, "tokens")
