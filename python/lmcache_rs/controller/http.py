"""HTTP/1.1 server on an asyncio Protocol, parsed by httptools (llhttp).

One :class:`HttpProtocol` per connection. State is grouped the usual way:

* server  -- :class:`HttpServerState`: settings, metrics, the open connections, the app;
* connection -- the protocol object: parser, response queue, flow control;
* request -- a few slots reset by ``on_message_begin``.

Requests are answered in order (pipelining): a handler that returns a response
synchronously is written at once when nothing is queued ahead of it, which is the
/lookup hot path; an awaitable response holds a slot in the queue and later
responses wait behind it. Reading pauses when the queue reaches the high-water mark.

Before the parser, complete plain ``POST /lookup`` requests at the start of a read, between
requests and with nothing queued, are answered by one call into Rust (``fast_lookup``, see
rust/http_fast.rs) with the same bytes the parser path would write; it leaves anything else
(the rest of the read included) to the parser.

Bad input is answered, never raised: a parse error is a 400, an oversized body a 413
(refused from its Content-Length before the body is read), oversized headers a 431,
a slow client a 408, then the connection is closed; after a closing answer the server ends its
side and reads and drops what the client still sends for a moment (``_linger``), so that a
client still sending does not lose the answer to a reset. Handler failures are logged and
answered with a bare 500. Idle connections are closed after the keep-alive timeout by
a periodic sweep (no timer per request).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import Any, Awaitable, Callable, Union

import httptools

from ..log_limit import RateLimitedLog, RepeatLimitedLog
from ..wire import FlowControl
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("lmcache_rs.controller.http")
log_refusal = RateLimitedLog(log)  # clients can cause these as fast as they connect
log_wrong_port = RepeatLimitedLog(log)  # a worker at this port retries every second or two: once a minute per host

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
HTML = b"text/html; charset=utf-8"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"

# (status, content type, body) and optionally extra header lines (each ending in CRLF).
Response = Union[tuple[int, bytes, bytes], tuple[int, bytes, bytes, bytes]]
Handler = Callable[["Request"], Union[Response, Awaitable[Response]]]

REASONS = {
    200: b"OK", 202: b"Accepted", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in REASONS.items()}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_OK_JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def encode_response(status: int, content_type: bytes, body: bytes, close: bool = False, extra: bytes = b"",
                    head: bool = False) -> bytes:
    """The response's bytes; to a HEAD request, the same head without the body (RFC 9110 9.3.2)."""
    return b"".join((
        status_line(status),
        b"Content-Type: ", content_type,
        b"\r\nContent-Length: ", str(len(body)).encode(),
        b"\r\nConnection: close\r\n" if close else b"\r\n",
        extra,
        b"\r\n",
        b"" if head else body,
    ))


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _encode(result: Any, close: bool, head: bool = False) -> bytes:
    extra = result[3] if len(result) == 4 else b""
    return encode_response(result[0], result[1], result[2], close, extra, head)


class Request:
    """The parts of a request a handler reads."""

    __slots__ = ("method", "path", "query", "body", "keep_alive", "credential", "peer")

    def __init__(self, method: bytes, path: bytes, query: bytes, body: bytes, keep_alive: bool,
                 credential: bytes | None = None, peer: str = "?"):
        self.method = method
        self.path = path
        self.query = query
        self.body = body
        self.keep_alive = keep_alive
        # the API key the client sent: X-API-Key, or the token of "Authorization: Bearer <token>"
        self.credential = credential
        self.peer = peer  # the client's "host:port", for the logs that say who asked


def _peer(address: Any) -> str:
    """A socket's peer as ``host:port`` (``[v6]:port``); "?" when unknown."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return "?" if not address else str(address)


class HttpServerState:
    """What every connection of one server shares."""

    def __init__(self, settings: Settings, metrics: Metrics, app: Callable[[Request], Any]):
        self.settings = settings
        self.metrics = metrics
        self.app = app  # app(request) -> Response or awaitable Response
        # the /lookup fast path (api.Lookup.answer), when the app answers POST /lookup with it
        self.fast_lookup: Any = None
        self.connections: set[HttpProtocol] = set()
        self.accepting = True
        self.group: list[HttpServerState] = [self]  # every HTTP loop of the process (one connection limit)
        # Request-body bytes buffered by this loop's connections, and the cap on them: the
        # process-wide --max-buffered-body-bytes split evenly over the loops (a per-loop counter
        # needs no lock). Without it memory would be bounded only by connections x body limit.
        self.buffered_body = 0
        # the controller's other ports, named to a worker that connects here: "monitor", and
        # LMCache's "pull" and "reply" (one dict shared by every HTTP loop)
        self.other_ports: dict[str, int] = {}
        self.max_buffered_body = max(1, settings.max_buffered_body_bytes // max(1, settings.http_threads))

    def total_connections(self) -> int:
        return sum(len(s.connections) for s in self.group)

    async def drain(self, servers: list[asyncio.AbstractServer], grace: float) -> None:
        """Graceful stop of this loop's HTTP side: stop accepting, let queued responses go
        out (up to ``grace`` s), close idle connections, and answer every request still
        waiting (or still arriving) with a 503 before closing the rest."""
        self.accepting = False
        for server in servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(c.queue or c.tasks for c in self.connections):
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.queue or conn.tasks or conn.receiving:
                conn.shed(f"the controller is shutting down: no answer within the {grace:g} s grace period; retry")
            else:
                conn.timeout(0, "shutting down")


class _Abort(Exception):
    """Raised inside a parser callback to stop parsing after a canned error response."""


class _Slot:
    __slots__ = ("data", "close", "head")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.close = False
        self.head = False  # the answer to a HEAD request: no body


class HttpProtocol(asyncio.Protocol):
    # Responses queued (pipelined requests not yet written) at which reading pauses.
    HIGH_WATER = 64
    # After a closing answer, what the client still sends is read and dropped for this long
    # (or up to this many bytes) before the connection closes (`_linger`).
    LINGER_S = 2.0
    LINGER_BYTES = 16 << 20

    def __init__(self, state: HttpServerState):
        self.state = state
        self.settings = state.settings
        self.metrics = state.metrics
        self.app = state.app
        fast = state.fast_lookup
        self.fast = fast.answer if fast is not None else None
        self.max_body = state.settings.max_body_bytes
        self.max_header = state.settings.max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.flow: FlowControl | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[_Slot] = collections.deque()
        self.tasks: set[asyncio.Task] = set()
        self.closing = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_left = 0
        self._peer_ended = False  # the client ended its side (EOF received)
        # activity counters read by the sweeper (cheaper than a timer per request)
        self.activity = 0
        self.begun = 0
        self.receiving = False
        # request state
        self._url = b""
        self._body: list[bytes] = []
        self._body_len = 0
        self._held = 0  # bytes of this request's body counted in state.buffered_body
        self._header_bytes = 0
        self._partial_header_bytes = 0
        self._began_here = False
        self._headers_done = False
        self._content_length = -1
        self._expect_continue = False
        self._continue_owed = False  # a 100 Continue waits for earlier answers to go out
        self._credential: bytes | None = None
        self._head = False  # the request is a HEAD: its answer, an error included, has no body

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = _peer(transport.get_extra_info("peername"))
        high_water = min(self.HIGH_WATER, self.settings.max_pipelined)
        self.flow = FlowControl(transport, high_water=max(1, high_water))
        state = self.state
        if not state.accepting or state.total_connections() >= self.settings.max_connections:
            self.metrics.connections_refused += 1
            self.metrics.count_rejected(503)
            transport.write(encode_response(503, JSON, error_body("too many connections"), close=True))  # type: ignore[attr-defined]
            self.closing = True
            transport.close()
            return
        state.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closing = True
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._release_body()
        self.state.connections.discard(self)
        for task in self.tasks:
            task.cancel()
        self.queue.clear()
        if self.flow is not None:
            self.flow.connection_lost()

    def pause_writing(self) -> None:
        assert self.flow is not None
        self.flow.pause_writing()
        self.flow.pause_reading()

    def resume_writing(self) -> None:
        assert self.flow is not None
        self.flow.resume_writing()
        self.flow.update(len(self.queue))

    def eof_received(self) -> bool | None:
        # The client finished sending; answer what is queued, then close.
        self._peer_ended = True
        if not self.queue:
            return None
        self._close_after_queue()
        return True

    def data_received(self, data: bytes) -> None:
        if self.closing:
            if self._linger_timer is not None:
                self._linger_left -= len(data)
                if self._linger_left < 0 and self.transport is not None:
                    self.transport.close()
            return
        self.activity += 1
        # the connection's first bytes, where another protocol's peer would show itself
        at_start = self.activity == 1
        # Fast path: complete plain POST /lookup requests at the start of this read are answered
        # in one call, only between requests and with no response pending (order is kept). The
        # rest goes to the parser, which answers it as it always does.
        if (self.fast is not None and not self.receiving and not self.queue
                and data.startswith(b"POST /lookup")):
            out, consumed, close = self.fast(data, self.max_header, self.max_body)
            if consumed:
                assert self.transport is not None
                self.transport.write(out)
                if close:
                    self.closing = True  # nothing after a closing response is read
                    self._linger(self.transport)
                    return
                if consumed == len(data):
                    return
                data = data[consumed:]
                at_start = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Abort):
                log.exception("http: callback failed")
                self._fail(500, "internal error")
            return
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrade is not supported")
            return
        except httptools.HttpParserError as exc:
            if at_start and data[:1] in (b"\x00", b"\xff"):  # a frame's length or a ZMQ greeting
                self._refuse_other_protocol(data[:1])
            else:
                self._fail(400, f"malformed HTTP request: {exc}")
            return
        if self.receiving and not self._headers_done:
            # Headers still incomplete: bound what a client can make the parser buffer. The
            # chunk in which the request began may also carry the previous request's tail, so
            # only whole chunks received after it are counted.
            if self._began_here:
                self._began_here = False
            else:
                self._partial_header_bytes += len(data)
                if self._partial_header_bytes > self.max_header:
                    self._fail(431, f"request headers exceed {self.max_header} bytes")

    # -- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.begun += 1
        self.receiving = True
        self._url = b""
        self._body = []
        self._body_len = 0
        self._header_bytes = 0
        self._partial_header_bytes = 0
        self._began_here = True
        self._headers_done = False
        self._content_length = -1
        self._expect_continue = False
        self._continue_owed = False
        self._credential = None
        self._head = False

    def on_url(self, url: bytes) -> None:
        if not self._url:
            self._head = self.parser.get_method() == b"HEAD"
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.max_header:
            self._fail(431, f"request line and headers exceed {self.max_header} bytes")
            raise _Abort

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.max_header:
            self._fail(431, f"request headers exceed {self.max_header} bytes")
            raise _Abort
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            # llhttp has already checked it is a number
            self._content_length = int(value)
        elif n == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True
        elif n == 9 and name.lower() == b"x-api-key":
            self._credential = value.strip()
        elif n == 13 and name.lower() == b"authorization" and self._credential is None:
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                self._credential = token.strip()

    def on_headers_complete(self) -> None:
        self._headers_done = True
        if self._content_length > self.max_body:
            self._fail(413, f"request body of {self._content_length} bytes exceeds the limit of {self.max_body}")
            raise _Abort
        state = self.state
        if self._content_length > 0 and state.buffered_body + self._content_length > state.max_buffered_body:
            self._busy()
            raise _Abort
        # 100 Continue is a response too: it goes out when nothing is queued ahead of it, so it
        # never overtakes an earlier answer; otherwise _flush sends it once those have gone
        if self._expect_continue and self.transport is not None:
            if self.queue:
                self._continue_owed = True
            else:
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        n = len(body)
        self._body_len += n
        if self._body_len > self.max_body:
            self._fail(413, f"request body exceeds the limit of {self.max_body} bytes")
            raise _Abort
        state = self.state
        state.buffered_body += n
        self._held += n
        if state.buffered_body > state.max_buffered_body:  # a chunked body, or over its Content-Length
            self._busy()
            raise _Abort
        self._body.append(body)

    def _release_body(self) -> None:
        self.state.buffered_body -= self._held
        self._held = 0

    def _busy(self) -> None:
        self._fail(503, f"server busy: request bodies being received exceed {self.state.max_buffered_body} bytes "
                   "in all; retry later", extra=b"Retry-After: 1\r\n")

    def on_message_complete(self) -> None:
        self.receiving = False
        self._continue_owed = False  # the body came without it
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        url = self._url
        q = url.find(b"?")
        if q >= 0:
            path, query = url[:q], url[q + 1:]
        else:
            path, query = url, b""
        body = self._body
        method = parser.get_method()
        head = self._head
        request = Request(
            method, path, query, body[0] if len(body) == 1 else b"".join(body), keep_alive,
            self._credential, self.peer,
        )
        self._body = []
        if self._held:
            self._release_body()
        try:
            result = self.app(request)
        except Exception:
            log.exception("http: handler for %s failed", path)
            result = (500, JSON, error_body("internal error"))
        if type(result) is not tuple:
            slot = _Slot()
            slot.close = not keep_alive
            slot.head = head
            self.queue.append(slot)
            task = asyncio.ensure_future(self._await(result, slot))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if not keep_alive:
                self.closing = True
                raise _Abort  # nothing after a closing request is read
            assert self.flow is not None
            self.flow.update(len(self.queue))
            return
        if keep_alive and result[0] == 200 and result[1] is JSON and len(result) == 3 and not head:
            body = result[2]
            data = b"%s%d\r\n\r\n%s" % (_OK_JSON_HEAD, len(body), body)
        else:
            data = _encode(result, not keep_alive, head)
        if not self.queue:
            assert self.transport is not None
            self.transport.write(data)
            if not keep_alive:
                self.closing = True
                self._linger(self.transport)
                raise _Abort  # nothing after a closing response is read
            return
        slot = _Slot()
        slot.data = data
        slot.close = not keep_alive
        self.queue.append(slot)
        if not keep_alive:
            self.closing = True
            raise _Abort
        assert self.flow is not None
        self.flow.update(len(self.queue))

    # -- responses -------------------------------------------------------------------------
    async def _await(self, awaitable: Awaitable[Response], slot: _Slot) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("http: async handler failed")
            result = (500, JSON, error_body("internal error"))
        slot.data = _encode(result, slot.close, slot.head)
        self._flush()

    def _flush(self) -> None:
        queue = self.queue
        transport = self.transport
        while queue and queue[0].data is not None:
            slot = queue.popleft()
            if transport is None or transport.is_closing() or self._linger_timer is not None:
                queue.clear()
                return
            transport.write(slot.data)  # type: ignore[arg-type]
            if slot.close:
                queue.clear()
                self.closing = True
                self._linger(transport)
                return
        if self._continue_owed and not queue and self.receiving and transport is not None:
            self._continue_owed = False
            transport.write(_CONTINUE)
        if self.flow is not None and not self.flow.write_paused:
            self.flow.update(len(queue))

    def _close_after_queue(self) -> None:
        if self.queue:
            self.queue[-1].close = True
            if self.queue[-1].data is not None:
                self._flush()
        elif self.transport is not None:
            self.closing = True
            self.transport.close()

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after a closing answer without losing it: send the end of our side (FIN) after
        the answer, then read and drop what the client still sends until it closes its side,
        for at most LINGER_S seconds and LINGER_BYTES bytes. Closing at once while its bytes
        arrive or wait unread (a body we refused, a slow client's next byte, requests pipelined
        after a closing one) makes the kernel answer with a reset, which can throw away the
        answer before the client reads it."""
        # nothing is read after a closing answer: a half-read request is over too
        self.receiving = False
        try:
            can_end = transport.can_write_eof()
        except NotImplementedError:  # (asyncio.Transport's default)
            can_end = False
        if self._peer_ended or not can_end:
            transport.close()  # (after the client's end nothing more comes that could be reset)
            return
        transport.write_eof()
        self._linger_left = self.LINGER_BYTES
        self._linger_timer = asyncio.get_running_loop().call_later(self.LINGER_S, transport.close)
        if self.flow is not None:
            self.flow.resume_reading()

    def _refuse_other_protocol(self, first: bytes) -> None:
        """A worker at the HTTP port (lmcache_rs's frames start with a zero length byte, a ZMQ
        greeting with 0xFF): say once a minute per host which port it wants, answer 400, close."""
        ports = self.state.other_ports
        if first == b"\xff":
            what = "a ZMQ peer (an LMCache worker?)"
            where = (f"LMCache workers report to the pull socket {ports['pull']} and the reply socket "
                     f"{ports.get('reply')} (controller_pull_url, controller_reply_url)" if "pull" in ports
                     else "LMCache workers need the controller started with --monitor-ports")
        else:
            what = "a peer speaking lmcache_rs's worker protocol"
            where = f"workers report to --monitor-port {ports.get('monitor')} (controller_pull_url)"
        message = f"this is lmcache_controller's HTTP port, not for {what}: {where}"
        log_wrong_port((self.peer.rsplit(":", 1)[0], first), "http %s: %s", self.peer, message)
        self.metrics.count_rejected(400)
        self.closing = True
        assert self.transport is not None
        self.transport.write(encode_response(400, JSON, error_body(message), close=True))
        self.transport.close()

    def _fail(self, status: int, message: str, force: bool = False, extra: bytes = b"") -> None:
        """Answer a canned error after what is queued, then close the connection."""
        self._body = []
        self._release_body()
        if (self.closing and not force) or self._linger_timer is not None:
            return  # (our side has ended: nothing more can be written)
        log_refusal("http: %d %s", status, message)
        self.metrics.count_rejected(status)
        head = self.receiving and self._head
        self.receiving = False
        slot = _Slot()
        slot.data = encode_response(status, JSON, error_body(message), close=True, extra=extra, head=head)
        slot.close = True
        self.queue.append(slot)
        self.closing = True  # read nothing more
        self._flush()

    # -- timeouts (called by the server's sweeper) -----------------------------------------
    def timeout(self, status: int, message: str) -> None:
        if status:
            self._fail(status, message, force=True)
        elif self.transport is not None:
            self.closing = True
            self.transport.close()

    def shed(self, message: str) -> None:
        """At shutdown, past the grace period: every request still waiting for its answer, or
        still arriving, gets a 503 in its place (in order, after the answers already made),
        then the connection closes. The client learns its request was not done, where an
        aborted connection would give it an empty reply."""
        for task in list(self.tasks):
            task.cancel()  # its answer is no longer awaited: the 503 takes its slot
        retry = b"Retry-After: 1\r\n"
        body = error_body(message)
        queue = self.queue
        for slot in queue:
            if slot.data is None:
                self.metrics.count_rejected(503)
                last = slot is queue[-1] and not self.receiving
                slot.data = encode_response(503, JSON, body, close=last, extra=retry, head=slot.head)
        if self.receiving:  # a request half received: refused like any limit, after the rest
            self._fail(503, message, force=True, extra=retry)
        elif queue:
            queue[-1].close = True
            self.closing = True
            self._flush()
        else:
            self.timeout(0, "shutting down")


class Sweeper:
    """Closes idle keep-alive connections and times out slow requests, a few times a second."""

    def __init__(self, state: HttpServerState):
        self.state = state
        s = state.settings
        self.interval = max(0.02, min(1.0, s.keepalive_timeout / 4, s.request_timeout / 4))
        self._seen: dict[HttpProtocol, tuple[int, int, float, float]] = {}

    def sweep(self, now: float) -> None:
        s = self.state.settings
        seen = self._seen
        live = self.state.connections
        for conn in list(seen):
            if conn not in live:
                del seen[conn]
        for conn in list(live):
            previous = seen.get(conn)
            if previous is None:
                seen[conn] = (conn.activity, conn.begun, now, now)
                continue
            activity, begun, active_at, begun_at = previous
            if conn.activity != activity:
                active_at = now
            if conn.begun != begun:
                begun_at = now
            seen[conn] = (conn.activity, conn.begun, active_at, begun_at)
            if conn.closing:
                continue
            if conn.receiving:
                if now - begun_at > s.request_timeout:
                    conn.timeout(408, f"request not received within {s.request_timeout:g} s")
            elif not conn.queue and not conn.tasks and now - active_at > s.keepalive_timeout:
                conn.timeout(0, "idle")
