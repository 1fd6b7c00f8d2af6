"""LMCache workers as a source: LMCache's controller sockets, its messages, its key space.

An unchanged LMCache 0.5.x worker (inside vLLM, or LMCache's standalone engine) reports to
these sockets exactly as it reports to LMCache's own controller:

``pull``       ZMQ PULL: admits/evicts (``BatchedKVOperationMsg``), full-sync batches, deregistration;
``reply``      ZMQ ROUTER: registration, P2P lookups, full-sync start and status, each answered;
``heartbeat``  ZMQ ROUTER (optional): heartbeats, answered with commands (a full sync).

Commands go back over a ZMQ REQ socket to each worker's ``lmcache_worker_ports`` REP socket.
The chunk keys are LMCache's (CPython's ``hash`` chain), so they go into an index of that key
space; the workers themselves join the controller's one registry.

Nothing a peer sends is trusted: frames are capped by the sockets (ZMQ_MAXMSGSIZE) before they
are decoded, decoding is typed, and a message that does not decode, or names a worker that is
not registered, is counted and dropped (logged at a limited rate) without touching the index
or stopping the socket's loop. A worker's sequence gap, or a worker that comes back by
heartbeat after the controller lost it, is answered with a full-sync command.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import logging
import socket
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from .. import Index, read_lmcache_push
from ..log_limit import RateLimitedLog
from ..wire import RemoteError, unpack_u32s
from ..wire.session import BAD_ARGS
from . import lmcache_messages as m
from .burst_reader import BurstReader
from .metrics import settle_writes
from .registry import Registry, WorkerRecord

log = logging.getLogger("lmcache_rs.controller.lmcache")

class _Sync:
    """One full sync of one location, from FullSyncStartMsg to FullSyncEndMsg."""

    __slots__ = ("sync_id", "batch_count", "batches", "keys", "events", "ended", "done")

    def __init__(self, sync_id: str, batch_count: int):
        self.sync_id = sync_id
        self.batch_count = batch_count
        self.batches: set[int] = set()
        self.keys: list[int] = []
        self.events: list[tuple] = []  # admits/evicts that arrive during the sync, applied after it
        self.ended = False
        self.done = False

    def missing(self) -> list[int]:
        return [b for b in range(self.batch_count) if b not in self.batches]


class LMCacheWorkerState:
    """What the source knows of one LMCache worker beyond its registry record."""

    __slots__ = ("record", "ip", "port", "peer_init_url", "next_seq", "syncs", "sync_reason", "heartbeats",
                 "req", "req_lock", "failures")

    def __init__(self, record: WorkerRecord, ip: str, port: int, peer_init_url: str | None):
        self.record = record
        self.ip = ip
        self.port = port
        self.peer_init_url = peer_init_url
        self.next_seq: dict[str, int] = {}  # location -> the seq_num expected next
        self.syncs: dict[str, _Sync] = {}  # location -> its current or last full sync
        self.sync_reason: str | None = None  # a full sync to ask for at the next heartbeat
        self.heartbeats = 0
        self.req: zmq.asyncio.Socket | None = None
        self.req_lock = asyncio.Lock()
        self.failures = 0  # commands failed in a row

    def syncing(self, location: str) -> _Sync | None:
        sync = self.syncs.get(location)
        return sync if sync is not None and not sync.done else None


def routable_ip() -> str:
    """The address other hosts reach this one at (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class LMCacheSource:
    """The LMCache adapter: binds the sockets, turns messages into index operations."""

    def __init__(self, settings: Any, registry: Registry, index: Any, metrics: Any):
        self.settings = settings
        self.registry = registry
        self.index = index
        self.metrics = metrics
        self.chunk_size = settings.chunk_size
        self.ports = dict(settings.monitor_ports or {})
        self.workers: dict[tuple[str, int], LMCacheWorkerState] = {}
        self.counts: dict[str, int] = {}  # message kind (or error) -> count
        self.socket_messages: dict[str, int] = {}  # socket name -> messages received (LMCache's metric)
        self.ctx: zmq.asyncio.Context | None = None
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.bound: dict[str, int] = {}  # socket name -> the port it is bound to
        self.tasks: list[asyncio.Task] = []
        self.event_counter = itertools.count(1)
        self.native_push = True  # the usual admit/evict batches read in Rust (False: all in msgspec)
        self.writes_behind = False  # the pull loop's batches go to the index's write thread
        self._warn = RateLimitedLog(log)
        self._heartbeat_host = ""

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.ctx = zmq.asyncio.Context()
        host = "*" if s.host in ("0.0.0.0", "", "*") else s.host
        try:
            for name, role in (("pull", zmq.PULL), ("reply", zmq.ROUTER), ("heartbeat", zmq.ROUTER)):
                if name not in self.ports:
                    continue
                sock = self.ctx.socket(role)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, s.lmcache_max_message_bytes)
                if name == "pull":
                    sock.setsockopt(zmq.RCVHWM, PULL_QUEUE_MESSAGES)
                port = self.ports[name]
                if port == 0:
                    port = sock.bind_to_random_port(f"tcp://{_zmq_host(host)}")
                else:
                    sock.bind(f"tcp://{_zmq_host(host)}:{port}")
                self.sockets[name] = sock
                self.bound[name] = port
        except zmq.ZMQError as exc:
            self.close_sockets()
            raise OSError(f"cannot bind LMCache's controller sockets {self.ports}: {exc}") from None
        self._heartbeat_host = routable_ip() if host == "*" else s.host
        loop = asyncio.get_running_loop()
        if "pull" in self.sockets:
            self.tasks.append(loop.create_task(self._pull_loop(self.sockets["pull"])))
        for name in ("reply", "heartbeat"):
            if name in self.sockets:
                self.tasks.append(loop.create_task(self._router_loop(self.sockets[name], name)))
        self.tasks.append(loop.create_task(self._probe_loop()))
        log.info("LMCache workers: pull=%s reply=%s heartbeat=%s (key space: CPython hash, chunk_size=%d, "
                 "none_hash=%d)", self.bound.get("pull"), self.bound.get("reply"), self.bound.get("heartbeat"),
                 self.chunk_size, self.index.none_hash)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        for state in self.workers.values():
            _close(state.req)
            state.req = None
        self.close_sockets()

    def close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets = {}
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    def _count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    # registry hooks: this source's workers live in its one index
    def register_worker(self, instance_id: str, worker_id: int) -> None:
        self.index.register_worker(instance_id, worker_id)

    def remove_worker(self, instance_id: str, worker_id: int) -> int:
        return self.index.remove_worker(instance_id, worker_id)

    # -- PUSH messages ---------------------------------------------------------------------
    async def _pull_loop(self, sock: zmq.asyncio.Socket) -> None:
        # While reads keep coming, the index applies each batch on its own thread while this
        # one reads the next (see burst_reader.py).
        if isinstance(self.index, Index):
            self.index.start_write_behind()
            self.writes_behind = True
        reader = BurstReader(sock, self.settle)
        try:
            while True:
                frames: list[bytes] | None = await reader.next()
                pending = PendingOps()
                while frames is not None:
                    self.read_pull(frames, pending)
                    # reads already waiting join the same index batch: fewer, larger batches
                    frames = reader.waiting() if pending.keys < PULL_BATCH_KEYS else None
                self.apply_pending(pending, later=self.writes_behind)
        finally:
            self.settle()  # an error ends the loop: what it queued is still applied and counted

    def settle(self) -> None:
        """Wait for the batches the index applies behind the pull loop; count them."""
        if not self.writes_behind:
            return
        failed = settle_writes(self.index, self.metrics)
        if failed is not None:  # a bug: those batches are lost, as a direct write would have raised
            self._count("index_refused")
            self._warn("index batches applied behind the pull loop failed: %s", failed)

    def on_pull(self, frames: list[bytes]) -> None:
        """One read of the pull socket, applied (the loop above joins reads; tests use this)."""
        pending = PendingOps()
        self.read_pull(frames, pending)
        self.apply_pending(pending)

    def read_pull(self, frames: list[bytes], pending: PendingOps) -> None:
        """Decode one read of the pull socket (up to 50 messages, as LMCache's workers send
        them); admits and evicts join ``pending``, other messages take effect now.

        Batches of admits and evicts in the usual shape are read in Rust (``read_lmcache_push``),
        grouped per holder with no Python object per operation; every other frame is decoded
        here, in its place among them."""
        self.socket_messages["pull"] = self.socket_messages.get("pull", 0) + len(frames)
        done = 0
        if self.native_push:
            for start, end, holders in read_lmcache_push(frames):
                for frame in frames[done:start]:
                    self._read_frame(frame, pending)
                try:
                    self._on_native(frames[start:end], holders, pending)
                except Exception as exc:  # a handler bug must not stop the socket's loop
                    self._count("handler_errors")
                    log.exception("LMCache pull socket: %d batches read in Rust failed: %s", end - start, exc)
                done = end
        for frame in frames[done:]:
            self._read_frame(frame, pending)

    def _read_frame(self, frame: bytes, pending: PendingOps) -> None:
        try:
            msg = m.decode_push(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._count("decode_errors")
            self._warn("LMCache pull socket: dropped a message that does not decode (%d bytes): %s",
                       len(frame), exc)
            return
        try:
            self._on_push(msg, pending)
        except Exception as exc:  # a handler bug must not stop the socket's loop
            self._count("handler_errors")
            log.exception("LMCache pull socket: %s failed: %s", type(msg).__name__, exc)

    def _on_native(self, frames: list[bytes], holders: list[tuple], pending: PendingOps) -> None:
        """Consecutive BatchedKVOperationMsg frames read in Rust, per holder: what ``_on_ops``
        does message by message, holder by holder (holders share no state but a worker's
        sync_reason, which only a seq gap sets here)."""
        states = []
        for instance_id, worker_id, location, *_ in holders:
            state = self.workers.get((instance_id, worker_id))
            if state is not None and state.syncing(location) is not None:
                # a full sync buffers changes message by message, up to a limit: that path
                for frame in frames:
                    self._read_frame(frame, pending)
                return
            states.append(state)
        self._count("BatchedKVOperationMsg", len(frames))
        for state, (instance_id, worker_id, location, n, first, last, gaps, runs) in zip(states, holders):
            if state is None:
                self._count("unknown_worker", n - 1)
                self._known(instance_id, worker_id, "operations")
                continue
            expected = state.next_seq.get(location)
            if expected is not None and first != expected:
                self._seq_gap(state, location, expected, first)
            for expected, got in gaps:
                self._seq_gap(state, location, expected, got)
            state.next_seq[location] = last + 1
            holder = (instance_id, worker_id, location)
            for kind, keys in runs:
                pending.add(holder, kind, keys)

    def _seq_gap(self, state: LMCacheWorkerState, location: str, expected: int, got: int) -> None:
        self._count("seq_gaps")
        self._warn("LMCache worker %s/%d at %s: sequence jumped from %d to %d; asking for a full sync",
                   state.record.instance_id, state.record.worker_id, location, expected, got)
        state.sync_reason = "seq_gap"

    def apply_pending(self, pending: PendingOps, later: bool = False) -> None:
        """Apply what ``pending`` holds (``later``: queued for the index's write-behind
        thread, counted by ``settle``)."""
        if pending.keys:
            events = pending.events()
            pending.clear()
            if not self._apply(events, quiet=len(events) > 1, later=later):
                # one bad event must not cost the other holders theirs: each on its own
                for event in events:
                    self._apply([event], later=later)

    def _apply(self, events: list[tuple], quiet: bool = False, later: bool = False) -> bool:
        try:
            if later:
                self.index.apply_batch_later(events)  # validated now; counted by settle()
                admitted = evicted = 0
            else:
                admitted, evicted = self.index.apply_batch(events)
        except Exception as exc:  # checked before; the index has the last word
            if not quiet:
                self._count("index_refused")
                log.error("index refused a batch of %d LMCache events: %s", len(events), exc)
            return False
        self.registry.changes += 1
        self.metrics.admits += admitted
        self.metrics.evicts += evicted
        return True

    def _known(self, instance_id: str, worker_id: int, what: str) -> LMCacheWorkerState | None:
        state = self.workers.get((instance_id, worker_id))
        if state is None:
            self._count("unknown_worker")
            self._warn("LMCache %s from unregistered worker %s/%d dropped (it re-registers with its next "
                       "heartbeat, then full-syncs)", what, instance_id, worker_id)
        return state

    def _on_push(self, msg: Any, pending: PendingOps) -> None:
        cls = type(msg)
        self._count(cls.__name__)
        if cls is m.BatchedKVOperationMsg:
            self._on_ops(msg.instance_id, msg.worker_id, msg.location, msg.operations, pending)
        elif cls is m.KVAdmitMsg:
            self._on_ops(msg.instance_id, msg.worker_id, msg.location, [m.AdmitOp(msg.key, msg.seq_num)], pending,
                         check_seq=False)
        elif cls is m.KVEvictMsg:
            self._on_ops(msg.instance_id, msg.worker_id, msg.location, [m.EvictOp(msg.key, msg.seq_num)], pending,
                         check_seq=False)
        elif cls is m.FullSyncBatchMsg:
            self._on_sync_batch(msg)
        elif cls is m.FullSyncEndMsg:
            self.apply_pending(pending)  # what came before the end applies first
            self._on_sync_end(msg)
        elif cls is m.DeRegisterMsg:
            self.apply_pending(pending)
            state = self.workers.get((msg.instance_id, msg.worker_id))
            if state is not None:
                self.forget(state, "deregistered")

    def _on_ops(self, instance_id: str, worker_id: int, location: str, ops: list, pending: PendingOps,
                check_seq: bool = True) -> None:
        state = self._known(instance_id, worker_id, "operations")
        if state is None or not ops:
            return
        if not location:
            self._count("bad_location")
            return
        if check_seq:
            expected = state.next_seq.get(location)
            first = ops[0].seq_num
            if expected is not None and first != expected:
                self._seq_gap(state, location, expected, first)
            state.next_seq[location] = ops[-1].seq_num + 1
        try:
            runs = [("admit", [op.key for op in ops])]  # the usual batch: admits only
        except AttributeError:  # an EvictOp among them
            runs = _runs(ops)
        holder = (instance_id, worker_id, location)
        sync = state.syncing(location)
        if sync is not None:
            if len(sync.events) < self.settings.lmcache_max_sync_keys:
                sync.events.extend((kind, *holder, keys) for kind, keys in runs)
                return
            # more changes during one sync than it may buffer: the sync cannot end exact, so it
            # is dropped and the next heartbeat asks for a new one (which replaces the holdings)
            self._count("sync_refused")
            self._warn("LMCache worker %s/%d at %s: more than %d changes during full sync %s; asking for a new one",
                       instance_id, worker_id, location, self.settings.lmcache_max_sync_keys, sync.sync_id)
            state.syncs.pop(location, None)
            state.sync_reason = "sync_overflow"
        for kind, keys in runs:
            pending.add(holder, kind, keys)

    # -- full sync -------------------------------------------------------------------------
    def _on_sync_start(self, msg: m.FullSyncStartMsg) -> m.FullSyncStartRetMsg:
        state = self.workers.get((msg.instance_id, msg.worker_id))
        if state is None:
            return m.FullSyncStartRetMsg(sync_id=msg.sync_id, accepted=False, error_msg="worker not registered")
        current = state.syncing(msg.location)
        if current is not None and current.sync_id != msg.sync_id:
            return m.FullSyncStartRetMsg(sync_id=msg.sync_id, accepted=False,
                                         error_msg=f"sync {current.sync_id} is in progress")
        if not 0 <= msg.total_keys <= self.settings.lmcache_max_sync_keys or not 0 <= msg.batch_count <= 10**7:
            self._count("sync_refused")
            return m.FullSyncStartRetMsg(sync_id=msg.sync_id, accepted=False,
                                         error_msg=f"a full sync holds at most {self.settings.lmcache_max_sync_keys} keys")
        if current is None:
            state.syncs[msg.location] = _Sync(msg.sync_id, msg.batch_count)
        state.sync_reason = None
        log.info("LMCache worker %s/%d: full sync %s of %s started (%d keys in %d batches)", msg.instance_id,
                 msg.worker_id, msg.sync_id, msg.location, msg.total_keys, msg.batch_count)
        return m.FullSyncStartRetMsg(sync_id=msg.sync_id, accepted=True)

    def _sync_of(self, instance_id: str, worker_id: int, location: str, sync_id: str) -> _Sync | None:
        state = self._known(instance_id, worker_id, "full-sync message")
        if state is None:
            return None
        sync = state.syncing(location)
        if sync is None or sync.sync_id != sync_id:
            self._count("sync_stale")
            self._warn("LMCache worker %s/%d: full-sync message of an unknown sync %s dropped",
                       instance_id, worker_id, sync_id)
            return None
        return sync

    def _on_sync_batch(self, msg: m.FullSyncBatchMsg) -> None:
        sync = self._sync_of(msg.instance_id, msg.worker_id, msg.location, msg.sync_id)
        if sync is None or msg.batch_id in sync.batches:
            return
        if len(sync.keys) + len(msg.keys) > self.settings.lmcache_max_sync_keys:
            self._count("sync_refused")
            log.warning("LMCache worker %s/%d: full sync %s is larger than %d keys; abandoned", msg.instance_id,
                        msg.worker_id, msg.sync_id, self.settings.lmcache_max_sync_keys)
            self.workers[(msg.instance_id, msg.worker_id)].syncs.pop(msg.location, None)
            return
        sync.batches.add(msg.batch_id)
        sync.keys.extend(msg.keys)

    def _on_sync_end(self, msg: m.FullSyncEndMsg) -> None:
        sync = self._sync_of(msg.instance_id, msg.worker_id, msg.location, msg.sync_id)
        if sync is None:
            return
        sync.ended = True
        if sync.missing():
            return  # the worker asks for the status, resends what is missing, then ends again
        # One batch: the worker's holdings at this location become the synced keys (plus what
        # it reported during the sync); readers see the old holdings or the new, never half.
        events: list[tuple] = [("drop", msg.instance_id, msg.worker_id, msg.location, b"")]
        if sync.keys:
            events.append(("admit", msg.instance_id, msg.worker_id, msg.location, _packed(sync.keys)))
        events.extend(sync.events)
        self._apply(events)
        sync.keys, sync.events, sync.done = [], [], True
        self.workers[(msg.instance_id, msg.worker_id)].next_seq.pop(msg.location, None)
        self.metrics.syncs += 1
        log.info("LMCache worker %s/%d: full sync %s of %s done (%d keys)", msg.instance_id, msg.worker_id,
                 msg.sync_id, msg.location, msg.actual_total_keys)

    def _on_sync_status(self, msg: m.FullSyncStatusMsg) -> m.FullSyncStatusRetMsg:
        state = self.workers.get((msg.instance_id, msg.worker_id))
        sync = None
        if state is not None:
            sync = next((x for x in state.syncs.values() if x.sync_id == msg.sync_id), None)
        if sync is None:
            return m.FullSyncStatusRetMsg(sync_id=msg.sync_id, is_complete=False, global_progress=0.0,
                                          can_exit_freeze=True)
        missing = [] if sync.done else sync.missing()
        got = sync.batch_count - len(missing)
        progress = 1.0 if sync.done else (got / sync.batch_count if sync.batch_count else 0.0)
        # A worker may leave its freeze once its own sync is applied: unlike LMCache's
        # controller, nothing here waits for the other workers' syncs.
        return m.FullSyncStatusRetMsg(sync_id=msg.sync_id, is_complete=sync.done, global_progress=progress,
                                      can_exit_freeze=sync.done, missing_batches=missing)

    # -- request/reply messages ------------------------------------------------------------
    async def _router_loop(self, sock: zmq.asyncio.Socket, name: str) -> None:
        while True:
            frames = await sock.recv_multipart(copy=True)
            self.socket_messages[name] = self.socket_messages.get(name, 0) + 1
            if len(frames) < 2:
                self._count("malformed_envelopes")
                continue
            identity, payload = frames[0], frames[-1]
            try:
                msg = m.decode_request(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._count("decode_errors")
                self._warn("LMCache request dropped: it does not decode (%d bytes): %s", len(payload), exc)
                reply: Any = m.ErrorMsg(error=f"message does not decode: {exc}")
            else:
                self._count(type(msg).__name__)
                try:
                    reply = self.on_request(msg)
                except Exception as exc:
                    self._count("handler_errors")
                    log.exception("LMCache %s failed: %s", type(msg).__name__, exc)
                    reply = m.ErrorMsg(error=f"controller error: {exc}")
            try:
                await sock.send_multipart([identity, b"", m.encoder.encode(reply)])
            except zmq.ZMQError as exc:
                self._warn("LMCache reply to a worker not sent: %s", exc)

    def on_request(self, msg: Any) -> Any:
        if isinstance(msg, m.RegisterMsg):
            return self._on_register(msg)
        if isinstance(msg, m.HeartbeatMsg):
            return self._on_heartbeat(msg)
        if isinstance(msg, m.BatchedP2PLookupMsg):
            return self._on_p2p_lookup(msg)
        if isinstance(msg, m.FullSyncStartMsg):
            return self._on_sync_start(msg)
        if isinstance(msg, m.FullSyncStatusMsg):
            return self._on_sync_status(msg)
        return m.ErrorMsg(error=f"unexpected message {type(msg).__name__}")

    def _register(self, msg: Any, how: str) -> LMCacheWorkerState:
        """Add (or renew) the worker; raises ValueError when its instance id is not ours to take."""
        key = (msg.instance_id, msg.worker_id)
        state = self.workers.get(key)
        if state is not None:
            # the same worker again (it restarted): it holds nothing its old self reported
            self.index.apply_batch([("drop", key[0], key[1], None, b"")])
            self.registry.changes += 1
            if (state.ip, state.port) != (msg.ip, msg.port):
                _close(state.req)
                state.req = None
            state.ip, state.port, state.peer_init_url = msg.ip, msg.port, msg.peer_init_url
            state.next_seq.clear()
            state.syncs.clear()
            state.failures = 0
        else:
            record = self.registry.add_external(self, *key)
            state = LMCacheWorkerState(record, msg.ip, msg.port, msg.peer_init_url)
            self.workers[key] = state
        record = state.record
        record.host = msg.ip
        record.worker_port = msg.port
        record.p2p_host, record.p2p_port = _split_url(msg.peer_init_url)
        self.registry.touch(record)
        log.info("LMCache worker %s/%d %s from %s:%d (P2P %s)", key[0], key[1], how, msg.ip, msg.port,
                 msg.peer_init_url or "off")
        return state

    def _on_register(self, msg: m.RegisterMsg) -> Any:
        try:
            self._register(msg, "registered")
        except ValueError as exc:
            log.warning("LMCache worker %s/%d refused: %s", msg.instance_id, msg.worker_id, exc)
            return m.ErrorMsg(error=str(exc))
        extra = {}
        if "heartbeat" in self.bound:
            extra["heartbeat_url"] = f"{self._heartbeat_host}:{self.bound['heartbeat']}"
        return m.RegisterRetMsg(extra_config=extra)

    def _on_heartbeat(self, msg: m.HeartbeatMsg) -> Any:
        state = self.workers.get((msg.instance_id, msg.worker_id))
        if state is None:
            # the controller restarted or dropped it: take it back, and ask for what it holds
            try:
                state = self._register(msg, "re-registered by heartbeat")
            except ValueError as exc:
                self._warn("LMCache heartbeat of %s/%d refused: %s", msg.instance_id, msg.worker_id, exc)
                return m.ErrorMsg(error=str(exc))
            state.sync_reason = "worker_re_registered"
        state.heartbeats += 1
        state.failures = 0
        self.registry.touch(state.record)
        if state.sync_reason is not None:
            return m.HeartbeatRetMsg(commands=[m.FullSyncCommand(reason=state.sync_reason)])
        return m.HeartbeatRetMsg()

    def _on_p2p_lookup(self, msg: m.BatchedP2PLookupMsg) -> m.BatchedP2PLookupRetMsg:
        """The instance (other than the asker) holding the longest run of these keys, with the
        peer URL of the worker of the asker's rank when it has one."""
        miss = m.BatchedP2PLookupRetMsg(layout_info=[("", "", 0, "")])
        if not msg.hashes:
            return miss
        best: tuple[int, str, str, str] | None = None
        for instance_id, (location, chunks) in self.index.lookup_keys(msg.hashes).items():
            if instance_id == msg.instance_id:
                continue
            peer = self.workers.get((instance_id, msg.worker_id))
            if peer is None or not peer.peer_init_url:
                continue
            if best is None or chunks > best[0]:
                best = (chunks, instance_id, location, peer.peer_init_url)
        if best is None:
            return miss
        return m.BatchedP2PLookupRetMsg(layout_info=[(best[1], best[2], best[0], best[3])])

    # -- liveness --------------------------------------------------------------------------
    def forget(self, state: LMCacheWorkerState, reason: str) -> None:
        key = state.record.key
        if self.workers.get(key) is state:
            del self.workers[key]
        _close(state.req)
        state.req = None
        self.registry.remove(state.record, reason)

    async def _probe_loop(self) -> None:
        """Heartbeating workers that go silent, and others whose worker port stops answering,
        are gone: their holdings leave the index."""
        s = self.settings
        while True:
            await asyncio.sleep(s.lmcache_probe_interval)
            now = time.monotonic()
            for state in list(self.workers.values()):
                if state.heartbeats:
                    if now - state.record.last_seen > s.lmcache_worker_timeout:
                        self.metrics.workers_expired += 1
                        self.forget(state, f"no heartbeat for {s.lmcache_worker_timeout:g} s")
                elif not state.req_lock.locked():
                    asyncio.ensure_future(self._probe(state))

    async def _probe(self, state: LMCacheWorkerState) -> None:
        try:
            await self.request(state, m.HealthWorkerMsg(worker_event_id=self._event_id("Probe")),
                               timeout=self.settings.lmcache_probe_interval)
        except Exception:
            pass  # counted in state.failures by request()

    # -- commands --------------------------------------------------------------------------
    def _event_id(self, kind: str) -> str:
        return f"{kind}Worker{next(self.event_counter)}"

    def dial_host(self, state: LMCacheWorkerState) -> str:
        return self.settings.worker_host_override or state.ip

    async def request(self, state: LMCacheWorkerState, msg: Any, timeout: float | None = None) -> Any:
        """One control message to the worker's REP socket and its reply. Raises TimeoutError or
        OSError on failure; after ``lmcache_max_command_failures`` failures in a row the worker
        is taken as dead and removed."""
        timeout = self.settings.command_timeout if timeout is None else timeout
        async with state.req_lock:  # REQ: one request in flight
            if self.workers.get(state.record.key) is not state:
                raise OSError(f"worker {state.record.instance_id}/{state.record.worker_id} went away")
            if state.req is None:
                assert self.ctx is not None
                state.req = self.ctx.socket(zmq.REQ)
                state.req.setsockopt(zmq.LINGER, 0)
                state.req.setsockopt(zmq.MAXMSGSIZE, self.settings.lmcache_max_message_bytes)
                state.req.connect(f"tcp://{_zmq_host(self.dial_host(state))}:{state.port}")
            try:
                await asyncio.wait_for(state.req.send(m.encoder.encode(msg)), timeout)
                raw = await asyncio.wait_for(state.req.recv(), timeout)
                reply = m.control_reply_decoder.decode(raw)
            except (asyncio.TimeoutError, zmq.ZMQError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                _close(state.req)  # a REQ socket that missed its reply cannot send again
                state.req = None
                state.failures += 1
                if state.failures >= self.settings.lmcache_max_command_failures:
                    log.warning("LMCache worker %s/%d did not answer %d commands in a row; removing it",
                                state.record.instance_id, state.record.worker_id, state.failures)
                    asyncio.get_running_loop().call_soon(self.forget, state, "stopped answering commands")
                if isinstance(exc, asyncio.TimeoutError):
                    raise TimeoutError(f"no reply in {timeout:g} s") from None
                raise OSError(f"bad reply: {exc}") from None
            state.failures = 0
            return reply

    async def call(self, record: WorkerRecord, op: str, args: dict) -> dict:
        """A command in our vocabulary (operations.py) carried out by an LMCache worker;
        the reply is translated back to ours. Raises RemoteError, TimeoutError or OSError."""
        state = self.workers.get(record.key)
        if state is None:
            raise OSError(f"worker {record.instance_id}/{record.worker_id} went away")
        tokens = unpack_u32s(args["tokens"]).tolist() if args.get("tokens") else []
        location = args.get("location")
        if op == "clear":
            locations = [location] if location else self._locations(record) or ["LocalCPUBackend"]
            total = 0
            for loc in locations:
                reply = self._checked(await self.request(state, m.ClearWorkerMsg(
                    worker_event_id=self._event_id("Clear"), location=loc)), m.ClearWorkerRetMsg)
                total += reply.num_tokens
            return {"cleared": _chunks(total, self.chunk_size)}
        if op == "pin":
            reply = self._checked(await self.request(state, m.PinWorkerMsg(
                worker_event_id=self._event_id("Pin"), location=location or "LocalCPUBackend",
                tokens=tokens)), m.PinWorkerRetMsg)
            return {"chunks": _chunks(reply.num_tokens, self.chunk_size)}
        if op in ("compress", "decompress"):
            cls = m.CompressWorkerMsg if op == "compress" else m.DecompressWorkerMsg
            ret = m.CompressWorkerRetMsg if op == "compress" else m.DecompressWorkerRetMsg
            reply = self._checked(await self.request(state, cls(
                worker_event_id=self._event_id(op.capitalize()), method=args["method"],
                location=location or "LocalCPUBackend", tokens=tokens or None)), ret)
            return {"chunks": _chunks(reply.num_tokens, self.chunk_size)}
        if op == "health":
            reply = await self.request(state, m.HealthWorkerMsg(worker_event_id=self._event_id("Health")))
            return {"ok": isinstance(reply, m.HealthWorkerRetMsg) and reply.error_code == 0}
        if op == "info":
            return {"locations": {loc: {"chunks": n} for loc, n in self._location_counts(record).items()}}
        raise RemoteError(BAD_ARGS, f"LMCache workers do not support {op!r}")

    async def move(self, source: WorkerRecord, target: WorkerRecord, src_location: str, dst_location: str,
                   tokens: list[int], copy: bool) -> int:
        """LMCache's move: the source worker sends the chunks to the target's P2P URL."""
        state = self.workers.get(source.key)
        target_state = self.workers.get(target.key)
        if state is None or target_state is None:
            raise OSError("a worker of the move went away")
        if not target_state.peer_init_url:
            raise RemoteError(BAD_ARGS, f"{target.instance_id}/{target.worker_id} has no P2P URL (p2p off)")
        reply = self._checked(await self.request(state, m.MoveWorkerMsg(
            worker_event_id=self._event_id("Move"), old_position=src_location,
            new_position=(target_state.peer_init_url, dst_location), tokens=tokens, copy=copy)), m.MoveWorkerRetMsg)
        return reply.num_tokens

    @staticmethod
    def _checked(reply: Any, expected: type) -> Any:
        if isinstance(reply, m.ErrorMsg):
            raise RemoteError("worker_error", reply.error)
        if not isinstance(reply, expected):
            raise RemoteError("bad_reply", f"expected {expected.__name__}, got {type(reply).__name__}")
        return reply

    def _location_counts(self, record: WorkerRecord) -> dict[str, int]:
        return {loc: n for inst, wid, loc, n in self.index.holder_counts()
                if inst == record.instance_id and wid == record.worker_id}

    def _locations(self, record: WorkerRecord) -> list[str]:
        return sorted(self._location_counts(record))



# Keys read from the pull socket per index batch, at most (reads waiting are joined up to this).
PULL_BATCH_KEYS = 64 * 1024

# ZMQ messages the pull socket queues per connected worker (one is a multipart send, in which
# LMCache's worker puts up to 50 of its messages) before ZMQ stops reading that worker's
# connection: past it, reports wait in the kernel's socket buffers and the worker's own send
# queue, and nothing is dropped (PUSH/PULL never drops). ZMQ's default of 1,000 let a burst pile up in this process (the
# whole 78 MB of a 2 M-admit burst, in fresh pages that ZMQ's I/O thread faulted in while the
# loop waited for the index); bounded, the same few MB are reused (BENCHMARKS.md,
# lmcache_ingest: about a fifth off the end-to-end time).
PULL_QUEUE_MESSAGES = 64


class PendingOps:
    """Admits and evicts read from the pull socket and not yet applied: per holder (instance,
    worker, location), runs of one kind in arrival order. Holders are independent of each
    other, so one index event per run keeps every order that matters. A run's keys come in
    pieces: lists of ints (decoded in Python) or bytes of native 64-bit words (read in Rust)."""

    __slots__ = ("runs", "keys")

    def __init__(self) -> None:
        self.runs: dict[tuple[str, int, str], list[tuple[str, list[list[int] | bytes]]]] = {}
        self.keys = 0

    def add(self, holder: tuple[str, int, str], kind: str, keys: list[int] | bytes) -> None:
        runs = self.runs.get(holder)
        if runs is None:
            self.runs[holder] = [(kind, [keys])]
        elif runs[-1][0] == kind:
            runs[-1][1].append(keys)
        else:
            runs.append((kind, [keys]))
        self.keys += len(keys) >> 3 if type(keys) is bytes else len(keys)

    def events(self) -> list[tuple]:
        """Index events, keys packed: one per run."""
        return [(kind, *holder, _joined(pieces)) for holder, runs in self.runs.items() for kind, pieces in runs]

    def clear(self) -> None:
        self.runs = {}
        self.keys = 0


def _joined(pieces: list[list[int] | bytes]) -> bytes | list[int]:
    """A run's pieces as one key array."""
    if len(pieces) == 1 and type(pieces[0]) is bytes:
        return pieces[0]  # the usual run: one holder's keys of a read, packed in Rust
    packed = [p if type(p) is bytes else _packed(p) for p in pieces]
    if all(type(p) is bytes for p in packed):
        return b"".join(packed)
    keys: list[int] = []  # a key of 2^63 or more in a list: the index takes one list
    for p in packed:
        keys.extend(array.array("Q", p) if type(p) is bytes else p)
    return keys


def _runs(ops: list) -> list[tuple[str, list[int]]]:
    """A batch's ops as runs of one kind, in order."""
    runs: list[tuple[str, list[int]]] = []
    for op in ops:
        kind, key = ("admit", op.key) if type(op) is m.AdmitOp else ("evict", op.evicted_key)
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(key)
        else:
            runs.append((kind, [key]))
    return runs


def _packed(keys: list[int]) -> bytes | list[int]:
    """Keys as the index reads them fastest: native 64-bit words (a signed key and its unsigned
    twin are the same word to the index)."""
    try:
        return array.array("q", keys).tobytes()
    except OverflowError:  # a key of 2^63 or more (unsigned on the wire): the index takes the list
        return keys


def _chunks(num_tokens: int, chunk_size: int) -> int:
    return -(-max(0, num_tokens) // chunk_size)


def _split_url(url: str | None) -> tuple[str, int]:
    if not url:
        return "", 0
    host, _, port = url.rpartition(":")
    try:
        return host, int(port)
    except ValueError:
        return url, 0


def _zmq_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _close(sock: zmq.asyncio.Socket | None) -> None:
    if sock is not None:
        sock.close(linger=0)
