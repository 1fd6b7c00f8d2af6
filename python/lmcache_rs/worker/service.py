"""The network side of a worker, in one background thread with its own event loop.

* command server on ``lmcache_worker_host:lmcache_worker_ports(+rank)``: the controller's
  commands (docs/protocol.md, "Command connection") through the session layer; each command
  runs in a small thread pool and replies when it is done;
* P2P server on ``p2p_host:p2p_init_ports(+rank)`` (p2p.py, its own threads);
* reporter: the report connection to ``controller_pull_url`` (reporter.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from lmcache_rs.wire.framing import unpack_u32s
from lmcache_rs.wire.session import Session, serve

from . import p2p

if TYPE_CHECKING:
    from .engine import KVWorker

log = logging.getLogger("lmcache_rs.worker")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class WorkerService:
    def __init__(self, engine: "KVWorker"):
        self.engine = engine
        self.config = engine.config
        self.worker_port: Optional[int] = None
        self.p2p_port: Optional[int] = None
        self.p2p: Optional[p2p.P2PServer] = None
        self.reporter = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._stop: Optional[asyncio.Event] = None
        self._sessions: set[Session] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="lmcache-cmd")

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind the ports and connect; raises OSError when a port is taken."""
        port = self.config.p2p_port(self.engine.worker_id)
        if port is not None:
            host = self.config.p2p_host or "localhost"
            self.p2p = p2p.P2PServer(self.engine, host, port, self.config.max_frame_bytes)
            self.p2p.start()
            self.p2p_port = self.p2p.port
        self._thread = threading.Thread(target=self._run, name="lmcache-worker-service", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self.stop()
            raise self._error

    def stop(self) -> None:
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None and self._thread is not None and self._thread.is_alive():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.p2p is not None:
            self.p2p.close()
            self.p2p = None

    def _run(self) -> None:
        loop = self.loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = None
        reporter_task = None
        try:
            port = self.config.worker_port(self.engine.worker_id)
            if port is not None:
                server = await serve(
                    self.config.lmcache_worker_host,
                    port,
                    self._handlers(),
                    max_frame_bytes=self.config.max_frame_bytes,
                    on_open=self._sessions.add,
                    on_close=lambda session, exc: self._sessions.discard(session),
                    name="command",
                )
                self.worker_port = server.sockets[0].getsockname()[1]
            if self.config.enable_controller:
                from .reporter import Reporter

                self.reporter = Reporter(self)
                reporter_task = asyncio.ensure_future(self.reporter.run())
        except BaseException as exc:
            self._error = exc
            if server is not None:
                server.close()
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        # graceful shutdown: say bye, stop accepting, close command connections
        if self.reporter is not None:
            await self.reporter.stop()
        if reporter_task is not None:
            reporter_task.cancel()
            await asyncio.gather(reporter_task, return_exceptions=True)
        if server is not None:
            server.close()
            await self._close_sessions()
            await server.wait_closed()

    async def _close_sessions(self, timeout: float = 1.0) -> None:
        """Close the command connections, flushing their replies for up to ``timeout`` s; a
        peer that stopped reading would keep its connection (and shutdown) open forever, so
        what is still open then is aborted (as Reporter.stop does)."""
        sessions = list(self._sessions)
        for session in sessions:
            session.close()
        if not sessions:
            return
        waits = {asyncio.ensure_future(session.wait_closed()): session for session in sessions}
        _, still_open = await asyncio.wait(waits, timeout=timeout)
        for wait in still_open:
            waits[wait].abort()
        if still_open:
            await asyncio.wait(still_open, timeout=timeout)

    # -- commands -------------------------------------------------------------------------------
    async def _clear(self, args: dict) -> dict:
        # The evictions go out at once, and the reply says in which report frame: the controller
        # waits for that frame instead of clearing its index itself, which would also wipe what
        # this worker stores between the clear and the reply reaching it. The clear runs in the
        # pool; the flush runs here, on the loop that owns the report connection.
        location = _location(args)
        cleared = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.clear, location)
        seq = self.reporter.flush_events() if self.reporter is not None else None
        return {"cleared": cleared, "seq": seq}

    def _handlers(self) -> dict[str, Callable[[dict], Any]]:
        ops: dict[str, Callable[[dict], Any]] = {
            "health": lambda args: self.engine.health(),
            "info": lambda args: self.engine.info(),
            "pin": lambda args: {"chunks": self.engine.pin(_tokens(args), _location(args))},
            "unpin": lambda args: {"chunks": self.engine.unpin(_tokens(args), _location(args))},
            "lookup": lambda args: {"matched": self.engine.lookup(_tokens(args))},
            "evict": lambda args: {"chunks": self.engine.evict(_tokens(args), _location(args))},
            "compress": lambda args: self.engine.compress(_tokens(args), _method(args), _location(args)),
            "decompress": lambda args: self.engine.decompress(_tokens(args), _method(args), _location(args)),
            "fetch": self._fetch,
        }
        handlers = {op: self._in_pool(fn) for op, fn in ops.items()}
        handlers["clear"] = self._clear
        return handlers

    def _in_pool(self, fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
        def handler(args: dict) -> Any:
            return asyncio.get_running_loop().run_in_executor(self._executor, fn, args)

        return handler

    def _fetch(self, args: dict) -> dict[str, int]:
        source = args.get("source")
        if (
            not isinstance(source, (list, tuple))
            or len(source) != 2
            or not isinstance(source[0], str)
            or type(source[1]) is not int
        ):
            raise ValueError('fetch needs "source" as [host, p2p_port]')
        location = _location(args) or "LocalCPUBackend"
        return p2p.fetch(self.engine, _tokens(args), (source[0], source[1]), location)


def _tokens(args: dict) -> list[int]:
    tokens = args.get("tokens")
    if isinstance(tokens, (bytes, bytearray)):
        return list(unpack_u32s(bytes(tokens)))
    if isinstance(tokens, list) and all(type(t) is int and 0 <= t < 2**32 for t in tokens):
        return tokens
    raise ValueError('"tokens" must be packed little-endian u32 (bin)')


def _location(args: dict) -> Optional[str]:
    location = args.get("location")
    if location is not None and not isinstance(location, str):
        raise ValueError('"location" must be a string or nil')
    return location


def _method(args: dict) -> Optional[str]:
    method = args.get("method")
    if method is not None and not isinstance(method, str):
        raise ValueError('"method" must be a string or nil')
    return method
