"""The report connection: tells the controller what this worker holds (docs/protocol.md).

``hello`` → ``welcome``, then a full sync (``sync_start``/``sync_chunk``/``sync_end``) of
every location, then ``events`` frames (per-worker ``seq`` +1 each) carrying the admits and
evictions the store recorded in its event log, batched for ``report_interval`` seconds, and a
``heartbeat`` every ``heartbeat_interval`` (the welcome's value). A ``resync`` from the
controller gets a new full sync. Store and retrieve never wait for any of this: the store only
appends to its log and wakes this task. The messages are those of ``lmcache_rs.wire.report``.

When the connection cannot be made or drops, events are no longer recorded (the next full
sync carries the state) and the reporter reconnects with exponential backoff and jitter
(50 ms doubling to 2 s). On shutdown it sends ``bye``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Any, Callable, Optional, Protocol

from lmcache_rs.config import LMCacheConfig
from lmcache_rs.wire import report
from lmcache_rs.wire.framing import FrameError
from lmcache_rs.wire.session import Session, connect

log = logging.getLogger("lmcache_rs.worker.reporter")

MAX_KEYS_PER_FRAME = 65536  # 512 KiB of keys: far below any sensible max_frame_bytes
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
WELCOME_TIMEOUT = 5.0


class EventLog(Protocol):
    """What the reporter reads from a store (store.KVStore)."""

    def start_reporting(self, waker: Callable[[], None]) -> dict[str, list[int]]: ...
    def stop_reporting(self) -> None: ...
    def has_events(self) -> bool: ...
    def take_events(self) -> list[tuple[str, str, list[int]]]: ...


class Reporter:
    """The report link of one worker; run it with ``await run()`` on ``loop``."""

    def __init__(self, events: EventLog, hello: Callable[[], report.Hello], config: LMCacheConfig,
                 loop: asyncio.AbstractEventLoop):
        self.events = events
        self.hello = hello  # called at each connection: the ports are known by then
        self.config = config
        self.loop = loop
        self.seq = 0
        self.session: Optional[Session] = None
        self.synced = threading.Event()  # set after each full sync (tests wait on it)
        self.syncs = 0  # full syncs sent (tests)
        self._stopping = False
        self._wake = asyncio.Event()
        self._inbox: asyncio.Queue[Optional[dict[str, Any]]] = asyncio.Queue()
        self._resync = False
        self._last_error: Optional[str] = None
        self._welcomed = False
        self._live = False  # synced, and each recorded event goes out in an events frame

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stopping:
            welcomed = False
            try:
                welcomed = await self._connection()
            except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                self._note(f"controller link: {exc}")
            except Exception:
                log.exception("controller link failed")
            finally:
                self._live = False
                self.synced.clear()
                self.events.stop_reporting()
                if self.session is not None:
                    self.session.close()
                    self.session = None
            if self._stopping:
                return
            if welcomed:
                backoff = BACKOFF_MIN
            delay = backoff * (0.5 + random.random())
            backoff = min(backoff * 2, BACKOFF_MAX)
            try:
                await asyncio.wait_for(self._wait_stop(), delay)
            except asyncio.TimeoutError:
                pass

    async def _wait_stop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._wake.wait()

    async def stop(self) -> None:
        """Send bye and close the connection."""
        self._stopping = True
        self._wake.set()
        session = self.session
        if session is not None and not session.closed:
            try:
                self._send_events(session)
                session.send(report.bye())
                await asyncio.wait_for(session.drain(), 1.0)
            except Exception:
                pass
            session.close()
            try:
                await asyncio.wait_for(session.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                session.abort()

    def _note(self, message: str) -> None:
        # log a failure once, not at every retry
        if message != self._last_error:
            log.warning("%s; retrying", message)
            self._last_error = message

    # -- one connection -------------------------------------------------------------------------
    async def _connection(self) -> bool:
        host, port = self.config.controller_address()
        self._inbox = asyncio.Queue()
        self._resync = False
        self._welcomed = False
        session = await connect(
            host,
            port,
            on_message=self._on_message,
            on_close=self._on_close,
            max_frame_bytes=self.config.max_frame_bytes,
            name="report",
        )
        self.session = session
        reply = None
        if session.local_error is None:  # else what answered was refused already (e.g. an HTTP server)
            session.send(self.hello().to_message())
            reply = await asyncio.wait_for(self._inbox.get(), WELCOME_TIMEOUT)
        if reply is None:
            if session.local_error is not None:  # not the controller's monitor port: say what it is
                raise ConnectionError(f"{host}:{port} (controller_pull_url) refused: {session.local_error[1]}")
            raise ConnectionError("the controller closed the connection before welcome")
        if reply["t"] == report.ERROR:
            raise ConnectionError(f"the controller refused this worker: {report.describe_error(reply)}")
        if reply["t"] != report.WELCOME:
            raise ConnectionError(f"expected welcome, got {reply['t']!r}")
        self._welcomed = True
        try:
            interval, timeout = report.parse_welcome(reply)
        except FrameError as exc:
            raise ConnectionError(f"bad welcome from the controller: {exc}") from None
        # beat a little faster than asked so a slow beat never reaches the timeout
        interval = min(interval, timeout / 3)
        self._last_error = None
        log.info("connected to the controller at %s:%d", host, port)
        await self._full_sync(session)
        next_beat = time.monotonic() + interval
        while not self._stopping:
            timeout = max(0.0, next_beat - time.monotonic())
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            if self._stopping:
                break
            if session.closed:
                raise ConnectionError("the controller closed the connection")
            if self._resync:
                self._resync = False
                await self._full_sync(session)
            elif self.events.has_events():
                await asyncio.sleep(self.config.report_interval)  # let a batch build up
                self._send_events(session)
            now = time.monotonic()
            if now >= next_beat:
                session.send(report.heartbeat(self.seq))
                next_beat = now + interval
            await session.drain()
        return True

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message["t"]
        if kind == report.RESYNC:
            log.info("controller asked for a full sync: %s", message.get("reason"))
            self._resync = True
            self._wake.set()
        elif kind in (report.WELCOME, report.ERROR):
            if kind == report.ERROR and self._welcomed:  # before welcome, the refusal is reported by _connection
                self._note(f"the controller sent error {report.describe_error(message)}")
            self._inbox.put_nowait(message)
        else:
            log.warning("ignoring unexpected %r frame from the controller", kind)

    def _on_close(self, session: Session, exc: Optional[BaseException]) -> None:
        self._inbox.put_nowait(None)
        self._wake.set()

    def _waker(self) -> None:
        """Called by the store (any thread, its lock held) when the first event is queued."""
        try:
            self.loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # loop closed at shutdown
            pass

    # -- frames ---------------------------------------------------------------------------------
    async def _full_sync(self, session: Session) -> None:
        self._live = False
        holdings = self.events.start_reporting(self._waker)
        session.send(report.sync_start(self.seq))
        count = 0
        for location, keys in holdings.items():
            for start in range(0, len(keys), MAX_KEYS_PER_FRAME):
                batch = keys[start : start + MAX_KEYS_PER_FRAME]
                session.send(report.sync_chunk(location, batch))
                count += len(batch)
                await session.drain()
        session.send(report.sync_end(count))
        self.syncs += 1
        self._live = True
        self.synced.set()

    def flush_events(self) -> Optional[int]:
        """Send the events recorded so far now, and return the seq of the last events frame:
        once the controller has applied that seq it has everything up to here. None while not
        reporting (no link, or a full sync under way): the next full sync carries the state.
        Call it on the reporter's loop: the report connection is its transport."""
        asyncio.get_running_loop()  # raises RuntimeError on any other thread
        session = self.session
        if not self._live or session is None or session.closed:
            return None
        self._send_events(session)
        return self.seq

    def _send_events(self, session: Session) -> None:
        events = [
            (op, location, keys[i : i + MAX_KEYS_PER_FRAME])
            for op, location, keys in self.events.take_events()
            for i in range(0, len(keys), MAX_KEYS_PER_FRAME)
        ]
        ops: list[list[Any]] = []
        keys_in_frame = 0
        last: Optional[tuple[str, str, list[int]]] = None
        for op, location, keys in events:
            if last is not None and last[0] == op and last[1] == location and keys_in_frame + len(keys) <= MAX_KEYS_PER_FRAME:
                last[2].extend(keys)
            else:
                if keys_in_frame + len(keys) > MAX_KEYS_PER_FRAME and ops:
                    self._send_ops(session, ops)
                    ops, keys_in_frame = [], 0
                last = (op, location, list(keys))
                ops.append(last)  # type: ignore[arg-type]
            keys_in_frame += len(keys)
        if ops:
            self._send_ops(session, ops)

    def _send_ops(self, session: Session, ops: list) -> None:
        self.seq += 1
        session.send(report.events(self.seq, ops))
