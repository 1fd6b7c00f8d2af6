"""The monitor port: one :class:`MonitorProtocol` per worker report connection.

Messages and rules are those of docs/protocol.md ("Report connection"). Every frame is
validated in full before anything in it is applied; a frame that fails gets an ``error``
frame and the connection is closed (the frames before it on the connection stand).
"""

from __future__ import annotations

import asyncio
import logging

from ..config import RESERVED_INSTANCE_IDS
from ..log_limit import RateLimitedLog, RepeatLimitedLog
from ..wire import FrameDecoder, FrameError, encode_frame, report
from ..wire.auth import key_matches
from ..wire.framing import HTTP_STARTS
from .metrics import Metrics
from .registry import APPLY, BUFFERED, GAP, SYNCING, Registry, SyncTooLarge, WorkerInUse, WorkerRecord
from .settings import Settings

log = logging.getLogger("lmcache_rs.controller.monitor")
log_refusal = RateLimitedLog(log)  # strangers can cause these as fast as they connect
# a worker refused in hello retries every second or so: its refusal once a minute per host and reason
log_hello_refusal = RepeatLimitedLog(log)


class MonitorServerState:
    def __init__(self, settings: Settings, metrics: Metrics, registry: Registry):
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.connections: set[MonitorProtocol] = set()
        self.lmcache_ports: dict[str, int] = {}  # set once LMCache's sockets are bound (for the hint)
        self.zmq_warned = False
        self.http_port = 0  # set once the HTTP server listens (for the hint to HTTP clients)
        self.http_warned = False
        self.welcome = encode_frame(report.welcome(settings.heartbeat_interval, settings.heartbeat_timeout))


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
        if self.record is None:  # before a hello is accepted: a worker's retries repeat it
            # keyed by host and reason only: messages carry peer-chosen values
            log_hello_refusal((self.peer.rsplit(":", 1)[0], code), "monitor %s: refusing frame: %s: %s",
                              self.peer, code, message)
        else:
            log_refusal("monitor %s: refusing frame: %s: %s", self.peer, code, message)
        self.metrics.count_rejected_frame(code)
        self.send(report.error(code, message))
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

    def refuse_http_peer(self) -> None:
        """An HTTP request (curl at the wrong port): answer in HTTP, naming the right port."""
        self.metrics.count_rejected_frame("http_peer")
        text = (f"This is lmcache_controller's worker port (--monitor-port), which speaks lmcache_rs's worker "
                f"protocol. HTTP (/lookup and the rest) is served on port {self.state.http_port}.\n").encode()
        if not self.state.http_warned:
            self.state.http_warned = True
            log.warning("monitor %s: an HTTP client connected to --monitor-port; HTTP is on port %d",
                        self.peer, self.state.http_port)
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(text), text))
        self.close()

    def resync(self, reason: str) -> None:
        record = self.record
        if record is None:
            return
        log.info("worker %s/%d: asking for a full sync: %s", record.instance_id, record.worker_id, reason)
        self.metrics.resyncs += 1
        record.need_sync()
        self.send(report.resync(reason))

    # -- frames ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.record is None and not self.decoder.buffered:
            if data[:1] == b"\xff":
                self.refuse_zmq_peer()
                return
            if data[:4] in HTTP_STARTS:
                self.refuse_http_peer()
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
        try:
            self.dispatch_frame(message)
        except SyncTooLarge as exc:  # the connection closes, and its staged sync is given back
            raise FrameError(report.SYNC_TOO_LARGE, str(exc)) from None

    def dispatch_frame(self, message: dict) -> None:
        kind = message["t"]
        record = self.record
        if record is None:
            if kind != report.HELLO:
                raise FrameError("hello_required", f"the first frame must be hello, got {kind!r}")
            self.on_hello(message)
            return
        self.registry.touch(record)
        if kind == report.EVENTS:
            self.on_events(record, message)
        elif kind == report.HEARTBEAT:
            seq = report.parse_heartbeat(message)
            if not record.heartbeat_in_step(seq):
                self.resync(f"heartbeat says last seq {seq}, controller has {record.expected_seq - 1}")
        elif kind == report.SYNC_CHUNK:
            record.add_sync_chunk(*report.parse_sync_chunk(message))
        elif kind == report.SYNC_START:
            record.begin_sync(report.parse_sync_start(message))
        elif kind == report.SYNC_END:
            count = report.parse_sync_end(message)
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
        elif kind == report.PING:
            request_id = report.parse_ping(message)
            self.registry.flush()
            self.send(report.pong(request_id))
        elif kind == report.BYE:
            self.registry.remove(record, "said bye")
            self.close()
        elif kind == report.HELLO:
            raise FrameError("bad_frame", "hello sent twice on one connection")
        else:
            raise FrameError("unknown_type", f"unknown frame type {kind!r}")

    def on_hello(self, m: dict) -> None:
        s = self.settings
        hello = report.parse_hello(m)
        instance_id, worker_id = hello.instance_id, hello.worker_id
        if instance_id in RESERVED_INSTANCE_IDS:
            raise FrameError("bad_field", f"hello: instance_id may not be {instance_id!r} (a reserved response key)")
        mismatches = []
        if hello.chunk_size != s.chunk_size:
            mismatches.append(f"chunk_size {hello.chunk_size} (controller uses {s.chunk_size})")
        if hello.seed != s.hash_seed:
            mismatches.append(f"hash seed {hello.seed} (controller uses {s.hash_seed})")
        if mismatches:
            raise FrameError(
                report.CONFIG_MISMATCH,
                f"worker {instance_id}/{worker_id} refused: " + "; ".join(mismatches)
                + ". Workers and controller must share one config.",
            )
        if hello.worker_port == 0:  # registered, every command to it would fail as if it had not reconnected
            raise FrameError(report.CONFIG_MISMATCH,
                             f"worker {instance_id}/{worker_id} refused: it has no command port (worker_port 0); set "
                             "lmcache_worker_ports in its config: the controller sends /clear, /pin, /move and the "
                             "other commands there")
        api_key = hello.api_key
        if s.api_key is not None and not key_matches(api_key, s.api_key):
            raise FrameError(report.UNAUTHORIZED, f"hello of worker {hello.instance_id}/{hello.worker_id}: wrong or "
                                                  "missing api_key (controller_api_key must match --api-key)")
        try:
            self.record = self.registry.attach(self, hello)
        except WorkerInUse as exc:
            raise FrameError(report.WORKER_IN_USE, str(exc)) from None
        except ValueError as exc:  # the id is taken by a worker of another protocol, or another world size
            raise FrameError(report.CONFIG_MISMATCH, f"worker {instance_id}/{worker_id} refused: {exc}") from None
        self.decoder.max_frame_bytes = s.max_frame_bytes  # a known worker may send full-size frames
        assert self.transport is not None
        self.transport.write(self.state.welcome)

    def on_events(self, record: WorkerRecord, m: dict) -> None:
        seq, ops = report.parse_events(m)
        instance_id, worker_id = record.instance_id, record.worker_id
        events = [(op, instance_id, worker_id, location, hashes) for op, location, hashes in ops]
        # the frame is valid; now the record's sequence state decides what happens to it
        verdict = record.on_events(seq, events)
        if verdict == GAP:
            self.resync(f"events seq {seq}, expected {record.expected_seq}")
            return
        if verdict in (APPLY, BUFFERED):
            for op, _location, hashes in ops:
                if op == report.ADMIT:
                    self.metrics.admits += len(hashes) >> 3
                else:
                    self.metrics.evicts += len(hashes) >> 3
        if verdict == APPLY and events:
            self.registry.queue(events)
