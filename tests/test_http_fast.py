"""The /lookup fast path (rust/http_fast.rs through api.Lookup.answer) against the parser path.

Every case feeds the same bytes, cut the same way, to two HttpProtocols on fake transports:
one with the fast path, one without. What each writes, whether it closes, and the lookup
metrics must be identical (event ids too: both number their lookups from 1).
"""

from __future__ import annotations

import asyncio

import pytest

from fake_transport import attach
from lmcache_rs import Index
from lmcache_rs.controller.api import Lookup
from lmcache_rs.controller.http import JSON, HttpProtocol, HttpServerState
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.settings import Settings

TOKENS = list(range(1000, 1040))  # 10 chunks of 4


def make_index() -> Index:
    index = Index(4, 0)
    index.register_worker("a", 0)
    index.admit("a", 0, "LocalCPUBackend", tokens=TOKENS[:24])
    index.register_worker("b", 0)
    index.admit("b", 0, "GPU", tokens=TOKENS[:8])
    return index


class App:
    """/lookup through Lookup (as api.Api routes it); /slow* awaits a gate; the rest echoes."""

    def __init__(self, lookup: Lookup):
        self.lookup = lookup
        self.gate = asyncio.Event()

    def __call__(self, req):
        if req.path == b"/lookup" and req.method == b"POST":
            return self.lookup(req)
        if req.path.startswith(b"/slow"):
            return self.slow(req)
        return (200, JSON, b'{"path": "%s"}' % req.path)

    async def slow(self, req):
        await self.gate.wait()
        return (200, JSON, b'{"slow": "%s"}' % req.path)


class Side:
    def __init__(self, fast: bool, index: Index, applied_seq: int | None = None, **settings):
        self.metrics = Metrics()
        self.lookup = Lookup(index, self.metrics, "Lookup-t-")
        if applied_seq is not None:  # a replica's lookups
            self.lookup.applied_seq = lambda: applied_seq
        self.app = App(self.lookup)
        state = HttpServerState(Settings(**settings), self.metrics, self.app)
        self.fast_answered = 0  # bytes the fast path took (always 0 on the parser-only side)
        if fast:
            answer = self.lookup.answer

            def counting_answer(data, max_header, max_body):
                out, consumed, close = answer(data, max_header, max_body)
                self.fast_answered += consumed
                return out, consumed, close

            self.lookup.answer = counting_answer
            state.fast_lookup = self.lookup
        self.proto = HttpProtocol(state)
        self.t = attach(self.proto)

    def feed(self, *chunks: bytes) -> None:
        for c in chunks:
            self.proto.data_received(c)


def lookup_req(tokens=TOKENS, path="/lookup", version="1.1", extra="", body: bytes | None = None) -> bytes:
    if body is None:
        body = b'{"tokens": [%s]}' % ", ".join(map(str, tokens)).encode()
    return (f"POST {path} HTTP/{version}\r\nHost: a\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def other_req(path="/x") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()


def both(*chunks: bytes, settle: bool = False, applied_seq: int | None = None, **settings) -> tuple[Side, Side]:
    """Feed ``chunks`` to both sides and check they answered alike."""

    async def main():
        index = make_index()
        sides = Side(True, index, applied_seq, **settings), Side(False, index, applied_seq, **settings)
        for s in sides:
            s.feed(*chunks)
            if settle:
                s.app.gate.set()
        for _ in range(3):  # the slow responses, and connection_lost where the connection closed
            await asyncio.sleep(0)
        return sides

    fast, slow = asyncio.run(main())
    assert slow.fast_answered == 0
    assert bytes(fast.t.written) == bytes(slow.t.written)
    assert (fast.t.closed, fast.t.eof) == (slow.t.closed, slow.t.eof)
    assert fast.metrics.lookups == slow.metrics.lookups
    # the hit-ratio counts too: the fast path sums in Rust what the parser path counts per lookup
    for name in ("lookup_hits", "lookup_tokens", "lookup_matched_tokens"):
        assert getattr(fast.metrics, name) == getattr(slow.metrics, name), name
    assert fast.metrics.rejected_requests == slow.metrics.rejected_requests
    assert fast.lookup.counter == slow.lookup.counter
    return fast, slow


def test_fast_path_answers_with_the_parser_paths_bytes():
    fast, _ = both(lookup_req())
    out = bytes(fast.t.written)
    assert out.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ")
    assert b'"event_id": "Lookup-t-1"' in out and b'"a": ["LocalCPUBackend", 24]' in out
    assert fast.metrics.lookups == 1 and sum(fast.metrics._buckets) == 1
    m = fast.metrics
    assert (m.lookup_hits, m.lookup_tokens, m.lookup_matched_tokens) == (1, len(TOKENS), 24)
    assert fast.fast_answered == len(lookup_req())  # answered by the fast path, whole


def test_a_replicas_log_position_header_is_the_same_on_both_paths():
    request = lookup_req()
    closing = lookup_req(extra="Connection: close\r\n")
    fast, _ = both(request, request, closing, applied_seq=42)
    out = bytes(fast.t.written)
    assert out.count(b"\r\nX-Lmc-Seq: 42\r\n\r\n") == 3 and fast.t.done
    assert fast.fast_answered == 2 * len(request) + len(closing)


def test_pipelined_mix_of_fast_and_parser_requests_stays_in_order():
    stream = b"".join([
        lookup_req(), lookup_req(path="/lookup?detail=1"), other_req("/a"), lookup_req(TOKENS[:4]),
        lookup_req(path="/lookup?detail=true"), lookup_req(body=b'{"tokens": [-1]}'), lookup_req(),
        lookup_req(extra="Expect: 100-continue\r\n"), other_req("/slow1"), lookup_req(), lookup_req(TOKENS[:9]),
    ])
    fast, _ = both(stream, settle=True)
    assert bytes(fast.t.written).count(b"HTTP/1.1 ") == 12  # 11 requests and one 100 Continue
    assert fast.lookup.counter == 9
    assert fast.fast_answered >= len(lookup_req()) * 2  # at least the two plain ones at the start


@pytest.mark.parametrize("second", [lookup_req(TOKENS[:5]), other_req("/b")])
def test_split_at_every_byte(second):
    stream = lookup_req() + second + lookup_req(path="/lookup?detail=1")
    taken = 0
    for i in range(len(stream) + 1):
        fast, _ = both(stream[:i], stream[i:])
        taken += fast.fast_answered > 0
    assert taken > len(stream) // 2  # most splits leave whole requests for the fast path


def test_split_into_three_pieces():
    stream = lookup_req(TOKENS[:3]) + lookup_req(TOKENS[:7])
    for i in range(0, len(stream), 13):
        for j in range(i, len(stream), 17):
            both(stream[:i], stream[i:j], stream[j:])


def test_requests_behind_a_pending_response_wait_for_it():
    async def main():
        index = make_index()
        s = Side(True, index)
        s.feed(other_req("/slow1") + lookup_req())
        s.feed(lookup_req(TOKENS[:4]))  # a response is pending: not answered ahead of it
        await asyncio.sleep(0.01)
        assert bytes(s.t.written) == b""
        s.app.gate.set()
        await asyncio.sleep(0.01)
        out = bytes(s.t.written)
        assert out.index(b"/slow1") < out.index(b"Lookup-t-1") < out.index(b"Lookup-t-2")

    asyncio.run(main())


def test_limits_still_answered_413_and_431():
    fast, _ = both(lookup_req() + lookup_req(TOKENS * 4), max_body_bytes=400)
    assert b"HTTP/1.1 413 " in bytes(fast.t.written) and fast.t.done
    big = "X-Pad: " + "p" * 300 + "\r\n"
    fast, _ = both(lookup_req() + lookup_req(extra=big), max_header_bytes=300)
    assert b"HTTP/1.1 431 " in bytes(fast.t.written) and fast.t.done
    # a request exactly at the header limit is still answered (both paths)
    head = len(lookup_req(body=b"{}")) - 2
    fast, _ = both(lookup_req(body=b'{"tokens": []}'), max_header_bytes=head)
    assert bytes(fast.t.written).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("version,extra,closes", [
    ("1.1", "", False),
    ("1.1", "Connection: keep-alive\r\n", False),
    ("1.1", "Connection: close\r\n", True),
    ("1.0", "", True),
    ("1.0", "Connection: keep-alive\r\n", False),
    ("1.1", "Connection: Upgrade\r\nUpgrade: h2c\r\n", True),
])
def test_keep_alive_and_close(version, extra, closes):
    fast, _ = both(lookup_req(version=version, extra=extra) + lookup_req())
    assert fast.t.done == closes
    if not extra:
        assert fast.fast_answered >= len(lookup_req(version=version))
    if closes and "Upgrade" not in extra:
        assert bytes(fast.t.written).count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize("bad", [
    b"POST /lookup HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /lookup HTTP/1.1\r\nContent-Length: 2\n\r\n{}",
    b"POST /lookup HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"POST /lookup HTTP/1.1\r\nContent-Length: x\r\n\r\n{}",
    b"POST /lookup HTTP/1.1\r\n\r\n",
    b"POST /lookup HTTP/1.1\r\nBad Header: 1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /lookup HTTP/1.1\r\nX: \x01\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /lookup HTTP/9.9\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /lookup HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"tok",
    b"POST /lookup HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"tokens\"",
    b"POST /lookup HTTP/1.1\r\nContent-Length: 9\r\n\r\nnot json!",
    # a worker frame's or a ZMQ greeting's first bytes: another protocol only at the connection's start
    b"\x00\x00\x00\x07\xed\xed\xed\xed\xed\xed\xed",
    b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f",
])
def test_malformed_input_gets_the_parser_paths_answer(bad):
    fast, _ = both(lookup_req() + bad + lookup_req())
    assert fast.fast_answered >= len(lookup_req())  # the plain request ahead of it
    both(bad + lookup_req())


def test_body_that_is_not_utf8_is_refused_even_inside_an_ignored_value():
    body = b'{"note": "caf\xe9", "tokens": [1, 2, 3]}'
    fast, _ = both(lookup_req(body=body))
    out = bytes(fast.t.written)
    assert out.startswith(b"HTTP/1.1 400 ") and b"not UTF-8" in out
    # the same key with valid UTF-8 is looked up
    fast, _ = both(lookup_req(body=body.replace(b"\xe9", b"\xc3\xa9")))
    assert bytes(fast.t.written).startswith(b"HTTP/1.1 200 ")
