"""The NATS JetStream log shared by an ingest and its replicas: names, connection, envelope.

Stream ``LMC_OPS`` (subjects ``lmc.ops.>``, file storage, 2 min duplicate window) holds one
message per batch of index operations (oplog.py). Each key space's operations go to one subject,
written by the ingest alone; ``lmc.ops.ingest`` holds each ingest's claim on the log (no
operations; ingest.py). A message is a msgpack map:

    {"v": 1, "src": <subject tail>, "inc": <ingest incarnation>, "n": <message number of the
     incarnation on that subject>, "ts": <publish wall time>, "ops": [[space, op, instance_id,
     worker_id, location, keys], ...]}

and carries ``Nats-Msg-Id: <src>:<inc>:<n>``, so a publish retried after a lost ack is stored
once, and (every message after a claim) ``Nats-Expected-Last-Sequence``, so that only one
ingest writes at a time.
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack

from ..log_limit import RateLimitedLog

STREAM = "LMC_OPS"
SUBJECTS = "lmc.ops.>"
SUBJECT_PREFIX = "lmc.ops."
ENVELOPE_VERSION = 1
DUPLICATE_WINDOW = 120.0

log = logging.getLogger("lmcache_rs.controller")


async def connect(url: str, name: str) -> Any:
    """A NATS connection that waits for the server and reconnects for ever (a restarted server
    is picked up again)."""
    import nats

    warn = RateLimitedLog(log, burst=1, period=10.0)  # a server that is down says so every 10 s

    async def error_cb(exc: Exception) -> None:
        warn("NATS %s: %s", url, exc)

    try:
        return await nats.connect(url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                  connect_timeout=2, allow_reconnect=True, error_cb=error_cb)
    except Exception as exc:  # reported as a port that cannot be bound is: one line, exit 1
        raise OSError(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from None


async def ensure_stream(js: Any) -> Any:
    """The stream's info, creating the stream when it does not exist."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    try:
        return await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECTS], storage=StorageType.FILE,
                                         retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
                                         duplicate_window=DUPLICATE_WINDOW))
        return await js.stream_info(STREAM)


def stream_identity(info: Any) -> str:
    """The stream's creation time: a stream deleted and created again (or a NATS store lost)
    numbers its messages from 1 again, and a position in the old one means nothing in it.
    Empty when the server does not say."""
    return info.created.isoformat() if getattr(info, "created", None) else ""


def encode(src: str, inc: int, n: int, ts: float, ops: list) -> bytes:
    return msgpack.packb({"v": ENVELOPE_VERSION, "src": src, "inc": inc, "n": n, "ts": ts, "ops": ops},
                         use_bin_type=True)


def decode(data: bytes) -> dict:
    msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(msg, dict) or msg.get("v") != ENVELOPE_VERSION or not isinstance(msg.get("ops"), list):
        raise ValueError("not a version-1 index operation batch")
    return msg


def message_id(src: str, inc: int, n: int) -> str:
    return f"{src}:{inc}:{n}"
