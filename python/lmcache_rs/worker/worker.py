"""KVWorker: one tensor-parallel rank of an instance -- a store and the services around it.

The parts, each in its own module, are put together here and nowhere else:

* ``store``: the KV-cache chunks in their tiers (store.py, no network);
* the P2P server on ``p2p_host:p2p_init_ports(+rank)``, serving the store's chunks to peers
  (p2p.py, its own threads);
* one background thread with an event loop running the command server on
  ``lmcache_worker_host:lmcache_worker_ports(+rank)`` (commands.py) and the report link to
  ``controller_pull_url`` (reporter.py).

The library calls (store, retrieve, lookup, ...) go straight to the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Optional

import torch

from lmcache_rs.config import LMCacheConfig
from lmcache_rs.wire import report
from lmcache_rs.wire.session import Session, serve

from . import p2p
from .commands import command_handlers
from .reporter import Reporter
from .store import KVStore

# Command connections a worker keeps open at once (the controller needs one); more are refused.
MAX_COMMAND_CONNECTIONS = 64

log = logging.getLogger("lmcache_rs.worker")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class KVWorker:
    """The KV-cache worker of rank ``worker_id``.

    With ``serve=True`` (default) the services that the config asks for (controller, command
    port, P2P port) start at once; with ``serve=False`` call :meth:`start_services` later (e.g.
    after preloading). ``close()`` stops them, saying bye to the controller. Raises OSError
    when a port is taken, ValueError for a bad config or worker_id.
    """

    def __init__(self, config: LMCacheConfig, worker_id: int = 0, *, serve: bool = True):
        config.validate()
        if not 0 <= worker_id < config.world_size:
            raise ValueError(f"worker_id {worker_id} is not a rank of world_size {config.world_size} "
                             "(set world_size in the config to the instance's tensor-parallel size)")
        self.kvstore = KVStore(config, worker_id)
        self.config = config
        self.worker_id = worker_id
        self.instance_id = config.lmcache_instance_id
        self.worker_port: Optional[int] = None
        self.p2p_port: Optional[int] = None
        self.reporter: Optional[Reporter] = None
        self.p2p_server: Optional[p2p.P2PServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._stop: Optional[asyncio.Event] = None
        self._sessions: set[Session] = set()
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._closed = False
        if serve:
            try:
                self.start_services()
            except BaseException:
                self.close()
                raise

    # -- the library API: the store's --------------------------------------------------------
    def store(self, tokens: Any, kv: torch.Tensor, start: int = 0) -> int:
        return self.kvstore.store(tokens, kv, start)

    def retrieve(self, tokens: Any, device: str | torch.device | None = None,
                 out: Optional[torch.Tensor] = None) -> tuple[int, torch.Tensor]:
        return self.kvstore.retrieve(tokens, device, out)

    def lookup(self, tokens: Any) -> int:
        return self.kvstore.lookup(tokens)

    def pin(self, tokens: Any, location: Optional[str] = None) -> int:
        return self.kvstore.pin(tokens, location)

    def unpin(self, tokens: Any, location: Optional[str] = None) -> int:
        return self.kvstore.unpin(tokens, location)

    def evict(self, tokens: Any, location: Optional[str] = None) -> int:
        return self.kvstore.evict(tokens, location)

    def clear(self, location: Optional[str] = None) -> int:
        return self.kvstore.clear(location)

    def compress(self, tokens: Any, method: Optional[str] = None, location: Optional[str] = None) -> dict[str, int]:
        return self.kvstore.compress(tokens, method, location)

    def decompress(self, tokens: Any, method: Optional[str] = None, location: Optional[str] = None) -> dict[str, int]:
        return self.kvstore.decompress(tokens, method, location)

    def flush(self) -> None:
        self.kvstore.flush()

    def chunk_keys(self, tokens: Any) -> list[int]:
        return self.kvstore.chunk_keys(tokens)

    def health(self) -> dict[str, Any]:
        return self.kvstore.health()

    def fetch(self, tokens: Any, source: tuple[str, int], location: str = "LocalCPUBackend") -> dict[str, int]:
        """Pull the chunks of ``tokens`` held by the peer at ``source`` (host, p2p_port);
        see p2p.fetch. Raises p2p.TransferError (nothing stored) or ValueError."""
        return p2p.fetch(self.kvstore, list(tokens), source, location, api_key=self.config.controller_api_key)

    def info(self) -> dict[str, Any]:
        """The store's info with this worker's addresses."""
        return {
            **self.kvstore.info(),
            "host": self.config.lmcache_worker_host,
            "worker_port": self.worker_port,
            "p2p_host": self.config.p2p_host,
            "p2p_port": self.p2p_port,
        }

    def __enter__(self) -> "KVWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- services ----------------------------------------------------------------------------
    def start_services(self) -> None:
        """Bind the P2P and command ports and connect to the controller, as configured.
        Raises OSError when a port is taken, ConfigError (a ValueError) when the worker would
        report without a command port."""
        config = self.config
        config.check_command_port(self.worker_id)
        if self._thread is not None or not (
            config.enable_controller or config.lmcache_worker_ports is not None or config.p2p_init_ports is not None
        ):
            return
        port = config.p2p_port(self.worker_id)
        if port is not None:
            self.p2p_server = p2p.P2PServer(self.kvstore, config.p2p_host or "localhost", port, config.max_frame_bytes,
                                            api_key=config.controller_api_key)
            self.p2p_server.start()
            self.p2p_port = self.p2p_server.port
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="lmcache-cmd")
        self._thread = threading.Thread(target=self._run_loop, name="lmcache-worker-service", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._stop_services()
            raise self._start_error

    def command_sessions(self) -> list[Session]:
        """The open command connections (for tests and diagnostics)."""
        return list(self._sessions)

    def close(self) -> None:
        """Stop the services (saying bye to the controller), finish disk writes, free the pool."""
        if self._closed:
            return
        self._closed = True
        self._stop_services()
        self.kvstore.close()

    def hello(self) -> report.Hello:
        """Who this worker is, for the report link's hello."""
        config = self.config
        return report.Hello(
            instance_id=self.instance_id,
            worker_id=self.worker_id,
            world_size=config.world_size,
            host=config.lmcache_worker_host,
            worker_port=self.worker_port or 0,
            p2p_host=config.p2p_host or config.lmcache_worker_host,
            p2p_port=self.p2p_port or 0,
            chunk_size=self.kvstore.chunk_size,
            seed=self.kvstore.seed,
            api_key=config.controller_api_key,
        )

    def _stop_services(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread is not None and self._thread.is_alive():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self.p2p_server is not None:
            self.p2p_server.close()
            self.p2p_server = None

    def _run_loop(self) -> None:
        loop = self._loop = _new_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _flush_events(self) -> Optional[int]:
        return self.reporter.flush_events() if self.reporter is not None else None

    def _fetch(self, tokens: list[int], source: tuple[str, int], location: str) -> dict[str, int]:
        return p2p.fetch(self.kvstore, tokens, source, location, api_key=self.config.controller_api_key)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        config = self.config
        server = None
        reporter_task = None
        try:
            port = config.worker_port(self.worker_id)
            if port is not None:
                assert self._executor is not None
                handlers = command_handlers(self.kvstore, self._executor, self._fetch, self._flush_events)
                handlers["info"] = lambda args: self.info()
                server = await serve(
                    config.lmcache_worker_host,
                    port,
                    handlers,
                    max_frame_bytes=config.max_frame_bytes,
                    on_open=self._admit,
                    on_close=lambda session, exc: self._sessions.discard(session),
                    name="command",
                    require_key=config.controller_api_key,
                )
                self.worker_port = server.sockets[0].getsockname()[1]
            if config.enable_controller:
                self.reporter = Reporter(self.kvstore, self.hello, config, asyncio.get_running_loop())
                reporter_task = asyncio.ensure_future(self.reporter.run())
        except BaseException as exc:
            self._start_error = exc
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

    def _admit(self, session: Session) -> None:
        if len(self._sessions) >= MAX_COMMAND_CONNECTIONS:
            session.refuse("too_many_connections", f"this worker takes at most {MAX_COMMAND_CONNECTIONS} command "
                           "connections")
            return
        self._sessions.add(session)

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
