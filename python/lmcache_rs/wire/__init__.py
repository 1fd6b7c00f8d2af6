"""Length-prefixed msgpack frames shared by the controller, workers and peers (docs/protocol.md)."""

from .flow_control import FlowControl
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
from .session import (
    RemoteError,
    RequestTimeout,
    Session,
    SessionClosed,
    SessionError,
    connect,
    serve,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FlowControl",
    "FrameDecoder",
    "FrameError",
    "RemoteError",
    "RequestTimeout",
    "Session",
    "SessionClosed",
    "SessionError",
    "connect",
    "encode_frame",
    "pack_u32s",
    "pack_u64s",
    "serve",
    "unpack_u32s",
    "unpack_u64s",
]
