"""The monitor port: one :class:`MonitorProtocol` per worker report connection.

Messages and rules are those of docs/protocol.md ("Report connection"). Every frame is
validated in full before anything in it is applied; a frame that fails gets an ``error``
frame and the connection is closed (the frames before it on the connection stand).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from ..config import RESERVED_INSTANCE_IDS
from ..log_limit import RateLimitedLog
from ..wire import FrameDecoder, FrameError, encode_frame
from .metrics import Metrics
from .registry import LIVE, NEED_SYNC, SYNCING, Registry, WorkerRecord
from .settings import PROTOCOL_VERSION, Settings

log = logging.getLogger("lmcache_rs.controller.monitor")
log_refusal = RateLimitedLog(log)  # strangers can cause these as fast as they connect

MAX_NAME_LEN = 256
_U64 = 2**64
_OPS = ("admit", "evict")


def _int(message: dict, field: str, lo: int = 0, hi: int = _U64) -> int:
    value = message.get(field)
    if type(value) is not int or not lo <= value < hi:
        raise FrameError("bad_field", f"{message['t']}: {field!r} must be an integer in [{lo}, {hi}), got {value!r}")
    return value


def _str(message: dict, field: str, where: str | None = None) -> str:
    value = message.get(field)
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LEN:
        raise FrameError(
            "bad_field", f"{where or message['t']}: {field!r} must be a non-empty string of at most "
            f"{MAX_NAME_LEN} characters, got {value!r:.80}"
        )
    return value


def _hashes(value: Any, where: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise FrameError("bad_field", f"{where}: hashes must be bin (packed little-endian u64), got {type(value).__name__}")
    if len(value) % 8:
        raise FrameError("bad_field", f"{where}: hashes must be a multiple of 8 bytes, got {len(value)}")
    return bytes(value)


class MonitorServerState:
    def __init__(self, settings: Settings, metrics: Metrics, registry: Registry):
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.connections: set[MonitorProtocol] = set()
        self.lmcache_ports: dict[str, int] = {}  # set once LMCache's sockets are bound (for the hint)
        self.zmq_warned = False
        self.welcome = encode_frame({
            "t": "welcome", "v": PROTOCOL_VERSION,
            "heartbeat_interval": settings.heartbeat_interval,
            "heartbeat_timeout": settings.heartbeat_timeout,
        })


class MonitorProtocol(asyncio.Protocol):
    def __init__(self, state: MonitorServerState):
        self.state = state
        self.settings = state.settings
        self.metrics = state.metrics
        self.registry = state.registry
        # until a hello is accepted, frames are held to the (small) hello limit
        self.decoder = FrameDecoder(min(state.settings.max_frame_bytes, state.settings.max_hello_frame_bytes))
        self.transport: asyncio.Transport | None = None
        self.record: WorkerRecord | None = None
        self.closing = False
        self.opened_at = 0.0
        self.peer = "?"

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.opened_at = asyncio.get_running_loop().time()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if len(self.state.connections) >= self.settings.max_monitor_connections:
            # counted, not logged: a flood of connections must not become a flood of log lines
            limit = self.settings.max_monitor_connections
            self.metrics.count_rejected_frame("too_many_connections")
            self.send({"t": "error", "code": "too_many_connections",
                       "message": f"the controller already has {limit} monitor connections"})
            self.close()
            return
        self.state.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closing = True
        self.state.connections.discard(self)
        record, self.record = self.record, None
        if record is not None and record.conn is self:
            self.registry.detached(record)

    def detach(self, replaced: bool) -> None:
        """Forget the worker (a newer connection took over, or it was removed) and close."""
        self.record = None
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()

    def send(self, message: dict) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(encode_frame(message))

    def reject(self, code: str, message: str) -> None:
        log_refusal("monitor %s: refusing frame: %s: %s", self.peer, code, message)
        self.metrics.count_rejected_frame(code)
        self.send({"t": "error", "code": code, "message": message})
        self.close()

    def refuse_zmq_peer(self) -> None:
        """A ZMQ greeting (it starts with 0xFF): an LMCache worker with its pull URL on this port."""
        self.metrics.count_rejected_frame("zmq_peer")
        ports = self.state.lmcache_ports
        where = (f"LMCache's sockets: pull {ports.get('pull')}, reply {ports.get('reply')}"
                 if ports else "no LMCache socket: start the controller with --monitor-ports")
        if self.state.zmq_warned is not True:
            self.state.zmq_warned = True
            log.warning("monitor %s: a ZMQ peer (an LMCache worker?) connected to --monitor-port, which speaks "
                        "lmcache_rs's own worker protocol. LMCache workers need controller_pull_url and "
                        "controller_reply_url set to %s (docs/lmcache-compat.md)", self.peer, where)
        self.close()

    def resync(self, reason: str) -> None:
        record = self.record
        if record is None:
            return
        log.info("worker %s/%d: asking for a full sync: %s", record.instance_id, record.worker_id, reason)
        self.metrics.resyncs += 1
        record.state = NEED_SYNC
        record.reset_sync()
        self.send({"t": "resync", "reason": reason})

    # -- frames ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.record is None and data[:1] == b"\xff" and not self.decoder.buffered:
            self.refuse_zmq_peer()
            return
        try:
            for message in self.decoder.frames(data):
                self.dispatch(message)
                if self.closing:
                    return
        except FrameError as exc:
            self.reject(exc.code, str(exc))
        except Exception:
            log.exception("monitor %s: failed to process a frame", self.peer)
            self.reject("internal_error", "the controller failed to process the frame")

    def dispatch(self, message: dict) -> None:
        kind = message["t"]
        record = self.record
        if record is None:
            if kind != "hello":
                raise FrameError("hello_required", f"the first frame must be hello, got {kind!r}")
            self.on_hello(message)
            return
        self.registry.touch(record)
        if kind == "events":
            self.on_events(record, message)
        elif kind == "heartbeat":
            seq = _int(message, "seq")
            if record.state != NEED_SYNC and seq != record.expected_seq - 1:
                self.resync(f"heartbeat says last seq {seq}, controller has {record.expected_seq - 1}")
        elif kind == "sync_chunk":
            location = _str(message, "location")
            hashes = _hashes(message.get("hashes"), "sync_chunk")
            if record.state == SYNCING:
                record.sync_chunks.append((location, hashes))
                record.sync_keys += len(hashes) // 8
        elif kind == "sync_start":
            seq = _int(message, "seq")
            record.reset_sync()
            record.state = SYNCING
            record.expected_seq = seq + 1
        elif kind == "sync_end":
            count = _int(message, "count")
            if record.state != SYNCING:
                return  # the tail of a sync abandoned by a resync
            if count != record.sync_keys:
                self.resync(f"sync_end says {count} keys, {record.sync_keys} arrived")
                return
            try:
                self.registry.replace_holdings(record)
            except Exception as exc:
                log.error("worker %s/%d: index refused the synced set: %s", record.instance_id, record.worker_id, exc)
                self.resync(f"index refused the synced set: {exc}")
                return
            log.info("worker %s/%d: full sync of %d keys applied", record.instance_id, record.worker_id, count)
        elif kind == "ping":
            request_id = _int(message, "id", hi=2**63)
            self.registry.flush()
            self.send({"t": "pong", "id": request_id})
        elif kind == "bye":
            self.registry.remove(record, "said bye")
            self.close()
        elif kind == "hello":
            raise FrameError("bad_frame", "hello sent twice on one connection")
        else:
            raise FrameError("unknown_type", f"unknown frame type {kind!r}")

    def on_hello(self, m: dict) -> None:
        s = self.settings
        version = _int(m, "v")
        instance_id = _str(m, "instance_id")
        if instance_id in RESERVED_INSTANCE_IDS:
            raise FrameError("bad_field", f"hello: instance_id may not be {instance_id!r} (a reserved response key)")
        worker_id = _int(m, "worker_id", hi=2**32)
        host = _str(m, "host")
        worker_port = _int(m, "worker_port", hi=65536)
        p2p_host = _str(m, "p2p_host")
        p2p_port = _int(m, "p2p_port", hi=65536)
        chunk_size = _int(m, "chunk_size", lo=1, hi=2**32)
        seed = _int(m, "seed")
        api_key = m.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise FrameError("bad_field", "hello: 'api_key' must be a string")
        mismatches = []
        if version != PROTOCOL_VERSION:
            mismatches.append(f"protocol version {version} (controller speaks {PROTOCOL_VERSION})")
        if chunk_size != s.chunk_size:
            mismatches.append(f"chunk_size {chunk_size} (controller uses {s.chunk_size})")
        if seed != s.hash_seed:
            mismatches.append(f"hash seed {seed} (controller uses {s.hash_seed})")
        if mismatches:
            raise FrameError(
                "config_mismatch",
                f"worker {instance_id}/{worker_id} refused: " + "; ".join(mismatches)
                + ". Workers and controller must share one config.",
            )
        if s.api_key is not None and (api_key is None or not hmac.compare_digest(api_key.encode(), s.api_key.encode())):
            raise FrameError("unauthorized", "hello: wrong or missing api_key")
        hello = {"instance_id": instance_id, "worker_id": worker_id, "host": host, "worker_port": worker_port,
                 "p2p_host": p2p_host, "p2p_port": p2p_port}
        try:
            self.record = self.registry.attach(self, hello)
        except ValueError as exc:  # the id is taken by a worker of another protocol
            raise FrameError("config_mismatch", f"worker {instance_id}/{worker_id} refused: {exc}") from None
        self.decoder.max_frame_bytes = s.max_frame_bytes  # a known worker may send full-size frames
        assert self.transport is not None
        self.transport.write(self.state.welcome)

    def on_events(self, record: WorkerRecord, m: dict) -> None:
        seq = _int(m, "seq")
        ops = m.get("ops")
        if not isinstance(ops, list):
            raise FrameError("bad_field", f"events: 'ops' must be a list, got {type(ops).__name__}")
        instance_id, worker_id = record.instance_id, record.worker_id
        events = []
        admits = evicts = 0
        for op in ops:
            if not isinstance(op, (list, tuple)) or len(op) != 3:
                raise FrameError("bad_field", "events: each op must be [op, location, hashes]")
            name, location, hashes = op
            if name not in _OPS:
                raise FrameError("bad_field", f"events: op must be 'admit' or 'evict', got {name!r:.40}")
            if not isinstance(location, str) or not location or len(location) > MAX_NAME_LEN:
                raise FrameError("bad_field", f"events: location must be a non-empty string, got {location!r:.80}")
            hashes = _hashes(hashes, "events")
            if name == "admit":
                admits += len(hashes) >> 3
            else:
                evicts += len(hashes) >> 3
            events.append((name, instance_id, worker_id, location, hashes))
        # the frame is valid; now its sequence number decides what happens to it
        state = record.state
        if state == NEED_SYNC:
            return
        if seq != record.expected_seq:
            self.resync(f"events seq {seq}, expected {record.expected_seq}")
            return
        record.expected_seq = seq + 1
        self.metrics.admits += admits
        self.metrics.evicts += evicts
        if state == LIVE:
            if events:
                self.registry.queue(events)
        else:  # SYNCING: applied after the synced set at sync_end
            record.sync_events.extend(events)
