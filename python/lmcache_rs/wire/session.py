"""Session layer: msgpack RPC over framed TCP (docs/protocol.md, "Command connection").

One :class:`Session` is the ``asyncio.Protocol`` of one connection. Either side may
call the other:

* ``await session.call(op, args)`` sends ``{"t": "command", "id", "op", "args"}`` and
  resolves with the ``result`` of the matching ``reply`` (raises :class:`RemoteError`
  on ``ok: false``, :class:`RequestTimeout` after ``timeout``, :class:`SessionClosed`
  when the connection goes away first). At most ``max_pending`` calls are in flight;
  further calls wait for a slot.
* Incoming ``command`` frames are dispatched by ``op`` through the ``handlers`` table
  (``op -> callable(args) -> result or awaitable``). At most ``max_concurrency`` run at
  once; the rest queue, and reading pauses when the queue reaches its high-water mark.
  A handler that raises (or an unknown op) answers ``ok: false`` with the error; the
  connection stays open.
* Any other frame type goes to ``on_message(message)`` (a plain function). Without one,
  or when it raises :class:`FrameError`, the peer gets an ``error`` frame and the
  connection is closed -- as for a frame that cannot be decoded.

Usage::

    server = await serve("localhost", 8001, {"health": health})
    session = await connect("localhost", 8001)
    print(await session.call("health"))
    session.close(); await session.wait_closed()
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import logging
from typing import Any, Awaitable, Callable, Mapping, Union

from ..log_limit import RepeatLimitedLog
from .auth import AUTH, AUTH_TIMEOUT, MAX_AUTH_FRAME_BYTES, UNAUTHORIZED, auth_frame, check_first_frame
from .flow_control import FlowControl
from .framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameError, encode_frame

log = logging.getLogger("lmcache_rs.wire")
# a bad peer can cause these as fast as it connects, and a client retrying a wrong port at every
# reconnection: once a minute per peer host and code
log_refusal = RepeatLimitedLog(log)

Handler = Callable[[dict], Union[Any, Awaitable[Any]]]

DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_MAX_PENDING = 1024


class SessionError(Exception):
    """Root of the session layer's errors."""


class SessionClosed(SessionError, ConnectionError):
    """The connection closed (or was never open) before the reply arrived."""


class RequestTimeout(SessionError, TimeoutError):
    """No reply within the call's timeout; a late reply is ignored."""


class RemoteError(SessionError):
    """The peer answered ``ok: false``; ``op``, the peer's ``error`` text and its ``code`` are
    kept (``"bad_args"``: the handler refused the arguments, a ValueError or TypeError)."""

    def __init__(self, op: str, error: str, code: str | None = None):
        super().__init__(f"{op}: {error}")
        self.op = op
        self.error = error
        self.code = code


BAD_ARGS = "bad_args"


def _is_int(value: Any) -> bool:
    return type(value) is int


class Session(asyncio.Protocol):
    """One framed msgpack connection with request/reply in both directions."""

    def __init__(
        self,
        handlers: Mapping[str, Handler] | None = None,
        *,
        on_message: Callable[[dict], None] | None = None,
        on_close: Callable[["Session", BaseException | None], None] | None = None,
        on_open: Callable[["Session"], None] | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
        handler_timeout: float | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_pending: int = DEFAULT_MAX_PENDING,
        name: str = "",
        require_key: str | None = None,
    ):
        if max_concurrency < 1 or max_pending < 1:
            raise ValueError("max_concurrency and max_pending must be at least 1")
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.on_message = on_message
        self.on_close = on_close
        self.on_open = on_open
        self.request_timeout = request_timeout
        self.handler_timeout = handler_timeout
        self.max_concurrency = max_concurrency
        self.name = name
        # when set, the peer's first frame must be auth with this key (wire/auth.py)
        self.require_key = require_key
        self.authenticated = require_key is None
        self.transport: asyncio.Transport | None = None
        self.flow: FlowControl | None = None
        self.remote_error: tuple[str, str] | None = None  # (code, message) of an error frame received
        self.local_error: tuple[str, str] | None = None  # (code, message) of the error frame we sent
        self.peer = "?"
        self.max_frame_bytes = max_frame_bytes
        # a stranger's first frame is small (the auth frame); full-size frames once it is proven
        self._decoder = FrameDecoder(max_frame_bytes if self.authenticated else min(max_frame_bytes, MAX_AUTH_FRAME_BYTES))
        self._auth_timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, str]] = {}
        self._slots = asyncio.Semaphore(max_pending)
        self._running: set[asyncio.Task] = set()
        self._backlog: collections.deque[dict] = collections.deque()
        self._closing = False
        self._closed: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow = FlowControl(transport, high_water=2 * self.max_concurrency)
        self._closed = asyncio.get_running_loop().create_future()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        if not self.name:
            self.name = self.peer if isinstance(peer, tuple) else "session"
        if not self.authenticated:
            self._auth_timer = asyncio.get_running_loop().call_later(AUTH_TIMEOUT, self._auth_expired)
        if self.on_open is not None:
            self.on_open(self)

    def _auth_expired(self) -> None:
        if not self.authenticated and not self._closing:
            self._reject(UNAUTHORIZED, f"no auth frame within {AUTH_TIMEOUT:g} s")

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            for message in self._decoder.frames(data):
                if self._closing:
                    return
                self._dispatch(message)
        except FrameError as exc:
            self._reject(exc.code, str(exc))
        except Exception:  # a bug in on_message: never let it escape into the loop
            log.exception("session %s: frame handler failed", self.name)
            self._reject("internal_error", "the receiver failed to process the frame")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closing = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        pending, self._pending = self._pending, {}
        reason = "connection closed"
        if self.remote_error is not None:
            reason = f"peer refused a frame: {self.remote_error[0]}: {self.remote_error[1]}"
        elif exc is not None:
            reason = f"connection lost: {exc}"
        for future, op in pending.values():
            if not future.done():
                future.set_exception(SessionClosed(f"{op}: {reason}"))
        for task in list(self._running):
            task.cancel()
        self._backlog.clear()
        if self.flow is not None:
            self.flow.connection_lost()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self.on_close is not None:
            try:
                self.on_close(self, exc)
            except Exception:
                log.exception("session %s: on_close failed", self.name)

    def pause_writing(self) -> None:
        if self.flow is not None:
            self.flow.pause_writing()

    def resume_writing(self) -> None:
        if self.flow is not None:
            self.flow.resume_writing()

    # -- sending --------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closing or self.transport is None

    def send(self, message: dict) -> None:
        """Write one frame now (dropped when the connection is closing)."""
        if self._closing or self.transport is None:
            raise SessionClosed(f"session {self.name} is closed")
        self.transport.write(encode_frame(message))

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self.flow is not None:
            await self.flow.drain()

    async def call(self, op: str, args: dict | None = None, *, timeout: float | None = -1.0) -> Any:
        """Send a command and return the peer's ``result``.

        ``timeout`` defaults to the session's ``request_timeout``; None waits forever.
        Raises RemoteError, RequestTimeout or SessionClosed.
        """
        if timeout is not None and timeout < 0:
            timeout = self.request_timeout
        loop = asyncio.get_running_loop()
        async with self._slots:
            if self._closing or self.transport is None:
                raise SessionClosed(f"{op}: session {self.name} is closed")
            request_id = next(self._ids)
            frame = encode_frame({"t": "command", "id": request_id, "op": op, "args": args if args is not None else {}})
            future = loop.create_future()
            self._pending[request_id] = (future, op)
            self.transport.write(frame)
            timer = None
            if timeout is not None:
                timer = loop.call_later(timeout, self._expire, request_id, timeout)
            try:
                return await future
            finally:
                if timer is not None:
                    timer.cancel()
                self._pending.pop(request_id, None)

    def _expire(self, request_id: int, timeout: float) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(RequestTimeout(f"{entry[1]}: no reply within {timeout:g} s"))

    def close(self) -> None:
        """Flush what was written and close."""
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self._closing = True
            self.transport.abort()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)

    def refuse(self, code: str, message: str) -> None:
        """Send an error frame and close (a server turning a connection away)."""
        self._reject(code, message)

    def _reject(self, code: str, message: str) -> None:
        """Answer a bad frame with an error frame and close (docs/protocol.md, Framing)."""
        self.local_error = (code, message)
        who = self.name if self.name == self.peer else f"{self.name} (peer {self.peer})"
        log_refusal((self.peer.rsplit(":", 1)[0], code), "session %s: rejecting frame: %s: %s", who, code, message)
        if self.transport is not None and not self._closing:
            self.transport.write(encode_frame({"t": "error", "code": code, "message": message}))
        self.close()

    # -- receiving ------------------------------------------------------------------------
    def _dispatch(self, message: dict) -> None:
        kind = message["t"]
        if not self.authenticated:
            if self.require_key is None or not check_first_frame(message, self.require_key):
                raise FrameError(UNAUTHORIZED, "the first frame must be auth with the API key")
            self.authenticated = True
            self._decoder.max_frame_bytes = self.max_frame_bytes
            if self._auth_timer is not None:
                self._auth_timer.cancel()
                self._auth_timer = None
            return
        if kind == AUTH:
            return  # a key this side does not ask for
        if kind == "reply":
            self._on_reply(message)
        elif kind == "command":
            self._on_command(message)
        elif kind == "error":
            code, text = message.get("code"), message.get("message")
            self.remote_error = (str(code), str(text))
            # an owner that takes the frame reports it in its own terms (the reporter once per
            # cause, not at every retry)
            level = logging.DEBUG if self.on_message is not None else logging.WARNING
            log.log(level, "session %s: peer sent error %s: %s", self.name, code, text)
            if self.on_message is not None:
                self.on_message(message)
            self.close()
        elif self.on_message is not None:
            self.on_message(message)
        else:
            raise FrameError("unknown_type", f"unexpected frame type {kind!r} on this connection")

    def _on_reply(self, message: dict) -> None:
        request_id = message.get("id")
        ok = message.get("ok")
        if not _is_int(request_id) or type(ok) is not bool:
            raise FrameError("bad_field", 'reply needs an integer "id" and a boolean "ok"')
        entry = self._pending.pop(request_id, None)
        if entry is None:
            log.debug("session %s: reply to unknown or expired request %d", self.name, request_id)
            return
        future, op = entry
        if future.done():
            return
        if ok:
            future.set_result(message.get("result"))
        else:
            error, code = message.get("error"), message.get("code")
            future.set_exception(RemoteError(op, error if isinstance(error, str) else "unknown error",
                                             code if isinstance(code, str) else None))

    def _on_command(self, message: dict) -> None:
        request_id, op = message.get("id"), message.get("op")
        args = message.get("args")
        if args is None:
            args = message["args"] = {}
        if not _is_int(request_id) or not isinstance(op, str) or not isinstance(args, dict):
            raise FrameError("bad_field", 'command needs an integer "id", a string "op" and a map "args"')
        if len(self._running) >= self.max_concurrency:
            self._backlog.append(message)
            assert self.flow is not None
            self.flow.update(len(self._running) + len(self._backlog))
            return
        self._start(message)

    def _start(self, message: dict) -> None:
        request_id, op, args = message["id"], message["op"], message["args"]
        handler = self.handlers.get(op)
        if handler is None:
            self._reply_error(request_id, f"unknown op {op!r}")
            return
        try:
            result = handler(args)
        except Exception as exc:
            self._reply_error(request_id, _describe(exc), _code(exc))
            return
        if not inspect.isawaitable(result):
            self._reply_ok(request_id, result)
            return
        task = asyncio.ensure_future(self._finish(request_id, op, result))
        self._running.add(task)
        task.add_done_callback(self._task_done)

    async def _finish(self, request_id: int, op: str, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        try:
            # Only this wait running out is a timeout of ours; a TimeoutError the handler
            # raises itself (a nested call, a socket) is its error and is answered as such.
            done, _ = await asyncio.wait({task}, timeout=self.handler_timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            self._reply_error(request_id, f"{op} timed out after {self.handler_timeout:g} s")
            return
        try:
            result = task.result()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("session %s: command %s failed: %s", self.name, op, _describe(exc))
            self._reply_error(request_id, _describe(exc), _code(exc))
        else:
            self._reply_ok(request_id, result)

    def _task_done(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        while self._backlog and len(self._running) < self.max_concurrency and not self._closing:
            self._start(self._backlog.popleft())
        if self.flow is not None:
            self.flow.update(len(self._running) + len(self._backlog))

    def _reply_ok(self, request_id: int, result: Any) -> None:
        if self._closing or self.transport is None:
            return
        try:
            frame = encode_frame({"t": "reply", "id": request_id, "ok": True, "result": result})
        except Exception as exc:  # result not serialisable: answer the error instead
            self._reply_error(request_id, f"result cannot be encoded: {exc}")
            return
        self.transport.write(frame)

    def _reply_error(self, request_id: int, error: str, code: str | None = None) -> None:
        if self._closing or self.transport is None:
            return
        reply = {"t": "reply", "id": request_id, "ok": False, "error": error}
        if code is not None:
            reply["code"] = code
        self.transport.write(encode_frame(reply))


def _code(exc: BaseException) -> str | None:
    return BAD_ARGS if isinstance(exc, (ValueError, TypeError)) else None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def connect(
    host: str,
    port: int,
    handlers: Mapping[str, Handler] | None = None,
    *,
    connect_timeout: float = 5.0,
    api_key: str | None = None,
    **session_kwargs: Any,
) -> Session:
    """Open a TCP connection and return its Session; with ``api_key`` its first frame proves
    the key (wire/auth.py). Raises OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    _, session = await asyncio.wait_for(
        loop.create_connection(lambda: Session(handlers, **session_kwargs), host, port), connect_timeout
    )
    if api_key is not None:
        session.send(auth_frame(api_key))
    return session


async def serve(
    host: str | None,
    port: int,
    handlers: Mapping[str, Handler] | None = None,
    **session_kwargs: Any,
) -> asyncio.Server:
    """Listen on host:port; every accepted connection gets its own Session over ``handlers``
    (with ``require_key=KEY``, one that must prove the key first)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Session(handlers, **session_kwargs), host, port)
