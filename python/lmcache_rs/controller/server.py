"""The controller process: HTTP server, monitor server, housekeeping, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

from .api import Api, ForwardingApp, Lookup
from .history import History
from .http import HttpProtocol, HttpServerState, Sweeper
from .kv_event_source import KVEventSource
from .key_space_check import KeySpaceCheck
from .lmcache_source import LMCacheSource
from .metrics import Metrics
from .monitor import MonitorProtocol, MonitorServerState
from .operations import EventIds, EventTracker, Operations
from .oplog import SPACE_LMCACHE, SPACE_OURS, kv_space
from .registry import Registry
from .replication import IngestRole, ReplicaRole
from .settings import Settings

log = logging.getLogger("lmcache_rs.controller")


class Controller:
    """Owns the index and both servers. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings, index: Any = None):
        settings.validate()
        if index is None:
            from .. import Index

            index = Index(settings.chunk_size, settings.hash_seed)
        self.settings = settings
        # the log roles (replication.py); None in single mode
        self.replication: IngestRole | ReplicaRole | None = None
        ingest: IngestRole | None = None
        if settings.role == "ingest":
            self.replication = ingest = IngestRole(self)
        self.index: Any = index if ingest is None else ingest.wrap(index, SPACE_OURS)
        self.metrics = Metrics()
        self.history = History(self.metrics)  # the dashboard's charts
        self.registry = Registry(self.index, self.metrics, settings.heartbeat_timeout, max_sync_bytes=settings.max_sync_bytes,
                                 sync_timeout=settings.sync_timeout)
        self.lmcache: LMCacheSource | None = None
        if settings.monitor_ports is not None or settings.role == "replica":  # a replica serves what the log has
            from .. import Index

            lmcache_index: Any = Index(settings.chunk_size, key_space="lmcache_builtin", none_hash=settings.none_hash)
            if ingest is not None:
                lmcache_index = ingest.wrap(lmcache_index, SPACE_LMCACHE)
            self.lmcache = LMCacheSource(settings, self.registry, lmcache_index, self.metrics)
        self.kv_events: KVEventSource | None = None
        if settings.kv_events or settings.role == "replica":  # a replica serves what the log has
            self.kv_events = KVEventSource(settings, self.registry, self.metrics)
            if ingest is not None:
                self.kv_events.namespaces.wrap_index = lambda ns: ingest.wrap(
                    ns.index, kv_space(ns.model, ns.lora_name, ns.cache_salt, ns.block_size))
        self.events = EventTracker(settings.event_history)
        self.event_ids = EventIds()
        self.ops = Operations(self.registry, settings.chunk_size, settings.command_timeout, self.events,
                              api_key=settings.api_key)
        self.http_state = HttpServerState(settings, self.metrics, app=None)  # type: ignore[arg-type]
        self.api = Api(self)
        self.http_state.app = self.api
        self.http_state.fast_lookup = self.api.lookup
        self.key_space_check: KeySpaceCheck | None = None
        if self.lmcache is not None:
            self.key_space_check = KeySpaceCheck(
                self.lmcache.index, settings.chunk_size, settings.lmcache_key_check_lookups,
                f"chunk_size={settings.chunk_size}, NONE_HASH={settings.none_hash} ({settings.none_hash_origin})")
            self.key_space_check.watch(self.api.lookup)
        self.monitor_state = MonitorServerState(settings, self.metrics, self.registry)
        self.sweeper = Sweeper(self.http_state)
        self.http_server: asyncio.AbstractServer | None = None
        self.monitor_server: asyncio.AbstractServer | None = None
        self._housekeeping: asyncio.Task | None = None
        self._snapshots: asyncio.Task | None = None
        self._key_checks: asyncio.Task | None = None
        self._dumped_changes = 0
        self._dumping: asyncio.Future | None = None  # the dump running in a thread, if any
        self.http_loops: list[HttpLoop] = []
        self.stopped = asyncio.Event()
        # set when the controller must end on its own (an ingest fenced): the process's exit status
        self.exit_requested = asyncio.Event()
        self.exit_status = 0
        if settings.role == "replica":
            self.replication = replica = ReplicaRole(self)
            self.api.lookup.applied_seq = lambda: replica.follower.applied

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        if s.role == "replica":
            await self._start_replica()
            return
        if s.snapshot:
            self._load_snapshot(s.snapshot)
        if self.replication is not None:  # the ingest: rebuild from the log before any source reports
            await self.replication.start()
        many = s.http_threads > 1
        if many and s.port:
            # SO_REUSEPORT would let us share the port with another process: check it is free first
            probe = await loop.create_server(asyncio.Protocol, s.host, s.port, reuse_address=True)
            probe.close()
            await probe.wait_closed()
        self.http_server = await loop.create_server(
            lambda: HttpProtocol(self.http_state), s.host, s.port, backlog=4096, reuse_address=True, reuse_port=many
        )
        try:
            self.monitor_server = await loop.create_server(
                lambda: MonitorProtocol(self.monitor_state), s.host, s.monitor_port, backlog=1024, reuse_address=True
            )
        except BaseException:
            self.http_server.close()
            raise
        try:
            self.monitor_state.http_port = self.http_port
            self.http_state.other_ports["monitor"] = self.monitor_port
            if self.lmcache is not None:
                await self.lmcache.start()
                self.monitor_state.lmcache_ports = dict(self.lmcache.bound)
                self.http_state.other_ports.update(self.lmcache.bound)
            if self.kv_events is not None:
                await self.kv_events.start()
        except BaseException:
            self.http_server.close()
            self.monitor_server.close()
            if self.lmcache is not None:
                await self.lmcache.stop()
            raise
        try:
            self._start_http_loops()
        except BaseException:
            await self._stop_http_loops(0)
            self.http_server.close()
            self.monitor_server.close()
            if self.lmcache is not None:
                await self.lmcache.stop()
            if self.kv_events is not None:
                await self.kv_events.stop()
            raise
        self._housekeeping = loop.create_task(self._tick())
        if s.snapshot:
            self._snapshots = loop.create_task(self._snapshot_loop())
        if self.key_space_check is not None and s.lmcache_key_check_lookups:
            self._key_checks = loop.create_task(self._key_check_loop())
        if self.lmcache is not None:
            log.info("LMCache key space: NONE_HASH=%d (%s)", s.none_hash, s.none_hash_origin)
        log.info(
            "lmcache_controller listening: http=%s monitor=%s (chunk_size=%d hash_seed=%d)",
            _addresses(self.http_server), _addresses(self.monitor_server), s.chunk_size, s.hash_seed,
        )

    async def _start_replica(self) -> None:
        """HTTP only: the index comes from the log, workers report to the ingest."""
        assert self.replication is not None
        s = self.settings
        await self.replication.start()
        loop = asyncio.get_running_loop()
        many = s.http_threads > 1
        if many and s.port:  # as in start(): SO_REUSEPORT must not share the port with another process
            probe = await loop.create_server(asyncio.Protocol, s.host, s.port, reuse_address=True)
            probe.close()
            await probe.wait_closed()
        self.http_server = await loop.create_server(
            lambda: HttpProtocol(self.http_state), s.host, s.port, backlog=4096, reuse_address=True, reuse_port=many)
        try:
            self._start_http_loops()
        except BaseException:
            await self._stop_http_loops(0)
            self.http_server.close()
            await self.replication.stop()
            raise
        self._housekeeping = asyncio.get_running_loop().create_task(self._tick())
        log.info("lmcache_controller listening: http=%s monitor=none (replica of %s; chunk_size=%d hash_seed=%d)",
                 _addresses(self.http_server), s.nats_url, s.chunk_size, s.hash_seed)

    def request_exit(self, status: int, reason: str) -> None:
        """Ask the process to shut down as on SIGTERM, then exit with ``status``."""
        if not self.exit_requested.is_set():
            log.critical("shutting down (exit status %d): %s", status, reason)
            self.exit_status = status
            self.exit_requested.set()

    @property
    def http_port(self) -> int:
        assert self.http_server is not None
        return self.http_server.sockets[0].getsockname()[1]

    @property
    def monitor_port(self) -> int:
        assert self.monitor_server is not None
        return self.monitor_server.sockets[0].getsockname()[1]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight HTTP responses finish (up to ``grace`` s), then close everything."""
        for state in self.http_state.group:
            state.accepting = False
        for server in (self.http_server, self.monitor_server):
            if server is not None:
                server.close()
        # the extra loops first: requests they forwarded still need this loop
        await self._stop_http_loops(grace)
        await self.http_state.drain([self.http_server] if self.http_server is not None else [], grace)
        for conn in list(self.monitor_state.connections):
            conn.detach(replaced=False)  # closed by us, not lost: the holdings stay for the snapshot
        self.registry.flush()
        tasks = list(self.ops.tasks)
        for task in (self._housekeeping, self._snapshots, self._key_checks):
            if task is not None:
                tasks.append(task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.settings.snapshot and self.settings.role == "single":  # a replica's snapshots are its own
            await self._dump_snapshot(force=True)
        if self.replication is not None:
            await self.replication.stop()
        for record in self.registry.workers.values():
            if record.command is not None:
                record.command.close()
        if self.lmcache is not None:
            await self.lmcache.stop()
        if self.kv_events is not None:
            await self.kv_events.stop()
        # let the transports run their close callbacks
        for _ in range(3):
            await asyncio.sleep(0)
        for server in (self.http_server, self.monitor_server):
            if server is not None:
                await server.wait_closed()
        self.stopped.set()
        log.info("lmcache_controller stopped")

    def _start_http_loops(self) -> None:
        """The extra event loops of --http-threads, on the HTTP server's addresses."""
        assert self.http_server is not None
        for k in range(1, self.settings.http_threads):
            extra = HttpLoop(self, k)
            extra.start([sock.getsockname()[:2] for sock in self.http_server.sockets])
            self.http_loops.append(extra)

    async def _stop_http_loops(self, grace: float) -> None:
        loops, self.http_loops = self.http_loops, []
        await asyncio.gather(*(extra.stop(grace) for extra in loops), return_exceptions=True)

    # -- snapshots -------------------------------------------------------------------------
    def _load_snapshot(self, path: str) -> None:
        try:
            self.index.load(path)
        except FileNotFoundError:
            log.info("no snapshot at %s yet; starting empty", path)
            return
        except Exception as exc:  # SnapshotError: corrupt, foreign, mismatched; the index is unchanged
            log.warning("snapshot %s not loaded (%s); starting empty", path, exc)
            return
        restored = self.registry.restore()
        log.info("snapshot %s loaded: %d chunks, %d workers (each must reconnect within %g s)",
                 path, len(self.index), restored, self.settings.heartbeat_timeout)

    async def _dump_snapshot(self, force: bool = False) -> None:
        # One dump at a time: a periodic one cancelled at shutdown goes on in its thread, and
        # the final dump must neither interleave with it nor be overwritten by it.
        if self._dumping is not None and not self._dumping.done():
            await asyncio.wait([self._dumping])
            if not self._dumping.cancelled() and self._dumping.exception() is not None:
                log.error("snapshot to %s failed: %s", self.settings.snapshot, self._dumping.exception())
        self.registry.flush()
        changes = self.registry.changes
        if not force and changes == self._dumped_changes:
            return
        path = self.settings.snapshot
        t0 = time.monotonic()
        try:
            # the index writes a temp file, fsyncs and renames; it releases the GIL meanwhile
            self._dumping = asyncio.get_running_loop().run_in_executor(None, self.index.dump, path)
            await asyncio.shield(self._dumping)
        except Exception as exc:
            log.error("snapshot to %s failed: %s", path, exc)
            return
        self._dumped_changes = changes
        log.debug("snapshot written to %s in %.3f s", path, time.monotonic() - t0)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval)
            await self._dump_snapshot()

    async def _key_check_loop(self) -> None:
        assert self.key_space_check is not None
        while True:
            await asyncio.sleep(self.settings.lmcache_key_check_interval)
            try:
                self.key_space_check.tick()
            except Exception:  # a diagnostic must never stop the controller
                log.exception("LMCache key-space check failed")

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(self.sweeper.interval, max(0.02, self.settings.heartbeat_timeout / 8))
        hello_timeout = self.settings.hello_timeout
        while True:
            await asyncio.sleep(interval)
            try:
                now = loop.time()
                self.sweeper.sweep(now)
                self.registry.expire(time.monotonic())
                for conn in list(self.monitor_state.connections):
                    if conn.record is None and not conn.closing and now - conn.opened_at > hello_timeout:
                        conn.reject("hello_timeout", f"no hello within {hello_timeout:g} s")
                self.history.sample()
            except Exception:  # housekeeping must never stop
                log.exception("housekeeping failed")


def _addresses(server: asyncio.AbstractServer) -> str:
    out = []
    for sock in server.sockets:
        addr = sock.getsockname()
        if sock.family == socket.AF_INET6:
            out.append(f"[{addr[0]}]:{addr[1]}")
        else:
            out.append(f"{addr[0]}:{addr[1]}")
    return ",".join(out)


class HttpLoop:
    """Another event loop, in its own thread, accepting on the main HTTP sockets.

    With ``--http-threads N`` the main loop and N-1 of these bind the HTTP addresses with
    SO_REUSEPORT. Their connections answer /lookup right there: ``Index.lookup_json`` releases the GIL, so
    lookups of several loops run on several cores. Everything else is forwarded to the
    main loop (see ``ForwardingApp``). Each loop has its own HTTP counters, summed by /metrics.
    """

    def __init__(self, controller: Controller, number: int):
        self.controller = controller
        self.number = number
        settings = controller.settings
        self.metrics = Metrics()
        controller.metrics.peers.append(self.metrics)
        self.state = HttpServerState(settings, self.metrics, app=None)  # type: ignore[arg-type]
        self.state.group = controller.http_state.group
        self.state.other_ports = controller.http_state.other_ports
        self.state.group.append(self.state)
        lookup = Lookup(controller.index, self.metrics, f"Lookup-{controller.event_ids.tag}.{number}-",
                        controller.registry, controller.lmcache, controller.kv_events)
        lookup.applied_seq = controller.api.lookup.applied_seq  # a replica's X-Lmc-Seq
        self.state.app = ForwardingApp(lookup, controller.api, asyncio.get_running_loop())
        self.state.fast_lookup = lookup
        if controller.key_space_check is not None:
            controller.key_space_check.watch(lookup)
        self.sweeper = Sweeper(self.state)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._grace = 5.0

    def start(self, addresses: list[tuple[str, int]]) -> None:
        """Start the thread and wait until it accepts; raises what its start raised."""
        self.thread = threading.Thread(target=self._run, args=(addresses,), name=f"lmcache-http-{self.number}",
                                       daemon=True)
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"HTTP loop {self.number} did not start")
        if self._error is not None:
            raise self._error

    def _run(self, addresses: list[tuple[str, int]]) -> None:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a declared dependency
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self.loop = loop
        try:
            loop.run_until_complete(self._main(addresses))
        except BaseException as exc:  # reported by start() when it happens there
            self._error = exc
            self._ready.set()
            log.exception("HTTP loop %d failed", self.number)
        finally:
            loop.close()

    async def _main(self, addresses: list[tuple[str, int]]) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        servers = []
        for host, port in addresses:  # same addresses, SO_REUSEPORT: the kernel spreads connections
            servers.append(await loop.create_server(lambda: HttpProtocol(self.state), host, port, backlog=4096,
                                                    reuse_address=True, reuse_port=True))
        sweep = loop.create_task(self._sweep())
        self._ready.set()
        await self._stop.wait()
        await self.state.drain(servers, self._grace)
        sweep.cancel()
        await asyncio.gather(sweep, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)
        for server in servers:
            await server.wait_closed()

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sweeper.interval)
            try:
                self.sweeper.sweep(loop.time())
            except Exception:
                log.exception("HTTP loop %d: sweep failed", self.number)

    def _request_stop(self, grace: float) -> None:
        self._grace = grace
        if self._stop is not None:
            self._stop.set()

    async def stop(self, grace: float) -> None:
        """Drain and end the thread (called on the main loop, which keeps running meanwhile)."""
        if self.loop is not None and self.thread is not None and self.thread.is_alive():
            try:
                self.loop.call_soon_threadsafe(self._request_stop, grace)
            except RuntimeError:  # its loop already closed
                pass
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join, grace + 5)
