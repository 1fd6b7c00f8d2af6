"""The report protocol (docs/protocol.md, "Report connection"), defined once for both sides.

A worker builds its frames with the builders here; the controller checks every frame it
receives with the parsers here, which raise :class:`FrameError` (code ``bad_field``) naming the
field before anything in the frame is applied. The worker checks the controller's few frames
(``welcome``, ``resync``, ``error``) with the same module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

from ..config import MAX_WORLD_SIZE
from .framing import FrameError, pack_u64s

# 2: hello carries world_size (an instance matches only when all its ranks hold a chunk)
PROTOCOL_VERSION = 2

MAX_NAME_LEN = 256  # instance ids, hosts and locations
U32 = 2**32
U64 = 2**64

# message kinds, worker to controller
HELLO = "hello"
HEARTBEAT = "heartbeat"
SYNC_START = "sync_start"
SYNC_CHUNK = "sync_chunk"
SYNC_END = "sync_end"
EVENTS = "events"
BYE = "bye"
PING = "ping"
# controller to worker
WELCOME = "welcome"
RESYNC = "resync"
PONG = "pong"
ERROR = "error"  # either direction

ADMIT = "admit"
EVICT = "evict"
OPS = (ADMIT, EVICT)

# error codes the controller sends on the report connection
CONFIG_MISMATCH = "config_mismatch"
UNAUTHORIZED = "unauthorized"
WORKER_IN_USE = "worker_in_use"
SYNC_TOO_LARGE = "sync_too_large"


# -- field checks --------------------------------------------------------------------------
def int_field(message: dict, field: str, lo: int = 0, hi: int = U64) -> int:
    value = message.get(field)
    if type(value) is not int or not lo <= value < hi:
        raise FrameError("bad_field", f"{message['t']}: {field!r} must be an integer in [{lo}, {hi}), got {value!r}")
    return value


def name_field(message: dict, field: str) -> str:
    return _name(message.get(field), f"{message['t']}: {field!r}")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LEN:
        raise FrameError("bad_field", f"{what} must be a non-empty string of at most {MAX_NAME_LEN} characters, "
                                      f"got {value!r:.80}")
    return value


def hashes_field(value: Any, where: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise FrameError("bad_field", f"{where}: hashes must be bin (packed little-endian u64), got {type(value).__name__}")
    if len(value) % 8:
        raise FrameError("bad_field", f"{where}: hashes must be a multiple of 8 bytes, got {len(value)}")
    return bytes(value)


def _positive_number(message: dict, field: str) -> float:
    value = message.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FrameError("bad_field", f"{message['t']}: {field!r} must be a positive number, got {value!r}")
    return float(value)


# -- hello ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """Who a worker is: tensor-parallel rank ``worker_id`` of the ``world_size`` ranks of an instance."""

    instance_id: str
    worker_id: int
    world_size: int
    host: str
    worker_port: int
    p2p_host: str
    p2p_port: int
    chunk_size: int
    seed: int
    api_key: Optional[str] = None
    v: int = PROTOCOL_VERSION

    def to_message(self) -> dict[str, Any]:
        message = {"t": HELLO, **asdict(self)}
        if self.api_key is None:
            del message["api_key"]
        return message


def parse_hello(message: dict) -> Hello:
    """A hello's fields, each checked (FrameError; ``config_mismatch`` for another protocol
    version, whose other fields may mean something else)."""
    version = int_field(message, "v")
    if version != PROTOCOL_VERSION:  # the other fields may differ too: report the version alone
        raise FrameError(CONFIG_MISMATCH, f"hello: protocol version {version} (controller speaks {PROTOCOL_VERSION}). "
                                          "Upgrade the worker and the controller together.")
    api_key = message.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        raise FrameError("bad_field", "hello: 'api_key' must be a string")
    hello = Hello(
        instance_id=name_field(message, "instance_id"),
        worker_id=int_field(message, "worker_id", hi=U32),
        world_size=int_field(message, "world_size", lo=1, hi=MAX_WORLD_SIZE + 1),
        host=name_field(message, "host"),
        worker_port=int_field(message, "worker_port", hi=65536),
        p2p_host=name_field(message, "p2p_host"),
        p2p_port=int_field(message, "p2p_port", hi=65536),
        chunk_size=int_field(message, "chunk_size", lo=1, hi=U32),
        seed=int_field(message, "seed"),
        api_key=api_key,
        v=version,
    )
    if hello.worker_id >= hello.world_size:
        raise FrameError("bad_field", f"hello: worker_id {hello.worker_id} is not a rank of world_size {hello.world_size}")
    return hello


def welcome(heartbeat_interval: float, heartbeat_timeout: float) -> dict[str, Any]:
    return {"t": WELCOME, "v": PROTOCOL_VERSION, "heartbeat_interval": heartbeat_interval,
            "heartbeat_timeout": heartbeat_timeout}


def parse_welcome(message: dict) -> tuple[float, float]:
    """(heartbeat_interval, heartbeat_timeout) of a welcome."""
    return _positive_number(message, "heartbeat_interval"), _positive_number(message, "heartbeat_timeout")


def error(code: str, text: str) -> dict[str, Any]:
    return {"t": ERROR, "code": code, "message": text}


def describe_error(message: dict) -> str:
    """``code: message`` of an error frame, whatever its fields hold."""
    return f"{str(message.get('code'))[:80]}: {str(message.get('message'))[:500]}"


# -- liveness and barriers -----------------------------------------------------------------
def heartbeat(seq: int) -> dict[str, Any]:
    return {"t": HEARTBEAT, "seq": seq}


def parse_heartbeat(message: dict) -> int:
    return int_field(message, "seq")


def bye() -> dict[str, Any]:
    return {"t": BYE}


def ping(request_id: int) -> dict[str, Any]:
    return {"t": PING, "id": request_id}


def parse_ping(message: dict) -> int:
    return int_field(message, "id", hi=2**63)


def pong(request_id: int) -> dict[str, Any]:
    return {"t": PONG, "id": request_id}


def resync(reason: str) -> dict[str, Any]:
    return {"t": RESYNC, "reason": reason}


# -- full sync -----------------------------------------------------------------------------
def sync_start(seq: int) -> dict[str, Any]:
    return {"t": SYNC_START, "seq": seq}


def parse_sync_start(message: dict) -> int:
    return int_field(message, "seq")


def sync_chunk(location: str, keys: Iterable[int]) -> dict[str, Any]:
    return {"t": SYNC_CHUNK, "location": location, "hashes": pack_u64s(keys)}


def parse_sync_chunk(message: dict) -> tuple[str, bytes]:
    """(location, packed keys) of a sync_chunk."""
    return name_field(message, "location"), hashes_field(message.get("hashes"), SYNC_CHUNK)


def sync_end(count: int) -> dict[str, Any]:
    return {"t": SYNC_END, "count": count}


def parse_sync_end(message: dict) -> int:
    return int_field(message, "count")


# -- incremental events --------------------------------------------------------------------
Op = tuple[str, str, bytes]  # ("admit" | "evict", location, packed keys)


def events(seq: int, ops: Iterable[tuple[str, str, Iterable[int]]]) -> dict[str, Any]:
    return {"t": EVENTS, "seq": seq, "ops": [[op, location, pack_u64s(keys)] for op, location, keys in ops]}


def parse_events(message: dict) -> tuple[int, list[Op]]:
    """(seq, ops) of an events frame, every op checked."""
    seq = int_field(message, "seq")
    ops = message.get("ops")
    if not isinstance(ops, list):
        raise FrameError("bad_field", f"events: 'ops' must be a list, got {type(ops).__name__}")
    parsed: list[Op] = []
    for op in ops:
        if not isinstance(op, (list, tuple)) or len(op) != 3:
            raise FrameError("bad_field", "events: each op must be [op, location, hashes]")
        name, location, hashes = op
        if name not in OPS:
            raise FrameError("bad_field", f"events: op must be 'admit' or 'evict', got {name!r:.40}")
        parsed.append((name, _name(location, "events: location"), hashes_field(hashes, EVENTS)))
    return seq, parsed
