"""The controller process: HTTP server, monitor server, housekeeping, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from .api import Api
from .http import HttpProtocol, HttpServerState, Sweeper
from .metrics import Metrics
from .monitor import MonitorProtocol, MonitorServerState
from .operations import EventIds, EventTracker, Operations
from .registry import Registry
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
        self.index = index
        self.metrics = Metrics()
        self.registry = Registry(index, self.metrics, settings.heartbeat_timeout)
        self.events = EventTracker(settings.event_history)
        self.event_ids = EventIds()
        self.ops = Operations(self.registry, settings.chunk_size, settings.command_timeout, self.events)
        self.http_state = HttpServerState(settings, self.metrics, app=None)  # type: ignore[arg-type]
        self.api = Api(self)
        self.http_state.app = self.api
        self.monitor_state = MonitorServerState(settings, self.metrics, self.registry)
        self.sweeper = Sweeper(self.http_state)
        self.http_server: asyncio.AbstractServer | None = None
        self.monitor_server: asyncio.AbstractServer | None = None
        self._housekeeping: asyncio.Task | None = None
        self._snapshots: asyncio.Task | None = None
        self._dumped_changes = 0
        self.stopped = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        if s.snapshot:
            self._load_snapshot(s.snapshot)
        self.http_server = await loop.create_server(
            lambda: HttpProtocol(self.http_state), s.host, s.port, backlog=4096, reuse_address=True
        )
        try:
            self.monitor_server = await loop.create_server(
                lambda: MonitorProtocol(self.monitor_state), s.host, s.monitor_port, backlog=1024, reuse_address=True
            )
        except BaseException:
            self.http_server.close()
            raise
        self._housekeeping = loop.create_task(self._tick())
        if s.snapshot:
            self._snapshots = loop.create_task(self._snapshot_loop())
        log.info(
            "lmcache_controller listening: http=%s monitor=%s (chunk_size=%d hash_seed=%d)",
            _addresses(self.http_server), _addresses(self.monitor_server), s.chunk_size, s.hash_seed,
        )

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
        self.http_state.accepting = False
        for server in (self.http_server, self.monitor_server):
            if server is not None:
                server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(c.queue or c.tasks for c in self.http_state.connections):
            await asyncio.sleep(0.01)
        for conn in list(self.http_state.connections):
            if conn.queue or conn.tasks:
                conn.abort()
            else:
                conn.timeout(0, "shutting down")
        for conn in list(self.monitor_state.connections):
            conn.close()
        self.registry.flush()
        tasks = list(self.ops.tasks)
        for task in (self._housekeeping, self._snapshots):
            if task is not None:
                tasks.append(task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.settings.snapshot:
            await self._dump_snapshot(force=True)
        for record in self.registry.workers.values():
            if record.command is not None:
                record.command.close()
        # let the transports run their close callbacks
        for _ in range(3):
            await asyncio.sleep(0)
        for server in (self.http_server, self.monitor_server):
            if server is not None:
                await server.wait_closed()
        self.stopped.set()
        log.info("lmcache_controller stopped")

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
        self.registry.flush()
        changes = self.registry.changes
        if not force and changes == self._dumped_changes:
            return
        path = self.settings.snapshot
        t0 = time.monotonic()
        try:
            # the index writes a temp file, fsyncs and renames; it releases the GIL meanwhile
            await asyncio.get_running_loop().run_in_executor(None, self.index.dump, path)
        except Exception as exc:
            log.error("snapshot to %s failed: %s", path, exc)
            return
        self._dumped_changes = changes
        log.debug("snapshot written to %s in %.3f s", path, time.monotonic() - t0)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval)
            await self._dump_snapshot()

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
                self.metrics.tick()
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
