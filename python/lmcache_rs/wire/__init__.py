"""Length-prefixed msgpack frames shared by the controller, workers and peers (docs/protocol.md)."""

from .framing import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    FrameError,
    encode_frame,
    pack_u32s,
    pack_u64s,
    unpack_u32s,
    unpack_u64s,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FrameDecoder",
    "FrameError",
    "encode_frame",
    "pack_u32s",
    "pack_u64s",
    "unpack_u32s",
    "unpack_u64s",
]
