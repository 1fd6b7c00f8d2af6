"""HTTP protocol tests: bytes fed through a fake transport into HttpProtocol."""

from __future__ import annotations

import asyncio
import json

import pytest

from fake_transport import attach
from lmcache_rs.controller.http import JSON, HttpProtocol, HttpServerState, Sweeper
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.settings import Settings


def run(coro):
    return asyncio.run(coro)


class App:
    def __init__(self):
        self.seen = []
        self.gates: dict[bytes, asyncio.Event] = {}

    def __call__(self, req):
        self.seen.append((req.method, req.path, req.query, req.body))
        if req.path == b"/boom":
            raise RuntimeError("secret internals")
        if req.path.startswith(b"/slow"):
            self.gates.setdefault(req.path, asyncio.Event())
            return self.slow(req)
        return (200, JSON, json.dumps({"path": req.path.decode(), "body": req.body.decode()}).encode())

    async def slow(self, req):
        await self.gates[req.path].wait()
        return (200, JSON, b'{"slow": "%s"}' % req.path)


def make(**settings):
    s = Settings(**settings)
    app = App()
    state = HttpServerState(s, Metrics(), app)
    proto = HttpProtocol(state)
    t = attach(proto)
    return state, app, proto, t


def responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((status, headers, rest[:n]))
        data = rest[n:]
    return out


def req(method="POST", path="/x", body=b"", extra=""):
    head = f"{method} {path} HTTP/1.1\r\nHost: a\r\n{extra}"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def test_keep_alive_and_pipelined_sync_requests():
    async def main():
        state, app, proto, t = make()
        proto.data_received(req(path="/a", body=b"1") + req(path="/b?detail=1", body=b"22") + req("GET", "/c"))
        rs = responses(t.take())
        assert [json.loads(b)["path"] for _, _, b in rs] == ["/a", "/b", "/c"]
        assert app.seen[1] == (b"POST", b"/b", b"detail=1", b"22")
        assert all(s == 200 and "connection" not in h for s, h, _ in rs)
        assert not t.done
        proto.data_received(req(path="/d", body=b"x"))
        assert len(responses(t.take())) == 1

    run(main())


def test_request_split_byte_by_byte():
    async def main():
        state, app, proto, t = make()
        data = req(path="/split", body=b'{"tokens": [1, 2, 3]}')
        for i in range(len(data)):
            proto.data_received(data[i:i + 1])
        (r,) = responses(t.take())
        assert json.loads(r[2]) == {"path": "/split", "body": '{"tokens": [1, 2, 3]}'}

    run(main())


def test_pipelined_responses_stay_in_order_behind_a_slow_one():
    async def main():
        state, app, proto, t = make()
        proto.data_received(req(path="/slow1") + req(path="/fast") + req(path="/slow2") + req(path="/fast2"))
        await asyncio.sleep(0)
        assert t.take() == b""
        app.gates[b"/slow2"].set()
        await asyncio.sleep(0.01)
        assert t.take() == b""  # /slow1 still holds the head of the queue
        app.gates[b"/slow1"].set()
        await asyncio.sleep(0.01)
        rs = responses(t.take())
        assert [json.loads(b).get("slow") or json.loads(b)["path"] for _, _, b in rs] == ["/slow1", "/fast", "/slow2", "/fast2"]

    run(main())


def test_reading_pauses_at_high_water_mark():
    async def main():
        state, app, proto, t = make(max_pipelined=4)
        proto.data_received(b"".join(req(path=f"/slow{i}") for i in range(4)))
        assert not t.reading and proto.flow.read_paused
        for i in range(4):
            app.gates[f"/slow{i}".encode()].set()
        await asyncio.sleep(0.01)
        assert len(responses(t.take())) == 4
        assert t.reading

    run(main())


def test_http10_and_connection_close_close_after_response():
    async def main():
        state, app, proto, t = make()
        proto.data_received(b"GET /x HTTP/1.0\r\n\r\n")
        (r,) = responses(t.take())
        assert r[0] == 200 and r[1]["connection"] == "close" and t.done
        state, app, proto, t = make()
        proto.data_received(req("GET", "/x", extra="Connection: close\r\n") + req("GET", "/never"))
        (r,) = responses(t.take())
        assert r[1]["connection"] == "close" and t.done
        assert [s[1] for s in app.seen] == [b"/x"]

    run(main())


def test_malformed_request_gets_400_and_close():
    async def main():
        state, app, proto, t = make()
        proto.data_received(b"HELLO WORLD\r\n\r\n")
        (r,) = responses(t.take())
        assert r[0] == 400 and "malformed" in json.loads(r[2])["error"] and t.done
        assert state.metrics.rejected_requests == {400: 1}

    run(main())


def test_body_over_limit_refused_from_content_length_before_reading_it():
    async def main():
        state, app, proto, t = make(max_body_bytes=100)
        proto.data_received(b"POST /lookup HTTP/1.1\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
        (r,) = responses(t.take())
        assert r[0] == 413 and "exceeds the limit of 100" in json.loads(r[2])["error"]
        assert r[1]["connection"] == "close" and t.done and app.seen == []

    run(main())


def test_chunked_body_over_limit_refused():
    async def main():
        state, app, proto, t = make(max_body_bytes=100)
        chunk = b"80\r\n" + b"x" * 128 + b"\r\n"
        proto.data_received(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
        (r,) = responses(t.take())
        assert r[0] == 413 and t.done and app.seen == []

    run(main())


def test_expect_continue_is_answered():
    async def main():
        state, app, proto, t = make()
        proto.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert t.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
        proto.data_received(b"abc")
        (r,) = responses(t.take())
        assert r[0] == 200 and json.loads(r[2])["body"] == "abc"

    run(main())


@pytest.mark.parametrize("how", ["one_header", "many_headers", "slow_drip", "url"])
def test_headers_over_limit_get_431(how):
    async def main():
        state, app, proto, t = make(max_header_bytes=1024)
        if how == "one_header":
            proto.data_received(b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        elif how == "many_headers":
            proto.data_received(b"GET /x HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n")
        elif how == "url":
            proto.data_received(b"GET /" + b"u" * 2000 + b" HTTP/1.1\r\n\r\n")
        else:  # a header that never ends, sent in small pieces
            proto.data_received(b"GET /x HTTP/1.1\r\nX-Big: ")
            for _ in range(40):
                if t.done:
                    break
                proto.data_received(b"a" * 100)
        (r,) = responses(t.take())
        assert r[0] == 431 and t.done and app.seen == []

    run(main())


def test_handler_exception_is_a_bare_500_without_traceback():
    async def main():
        state, app, proto, t = make()
        proto.data_received(req(path="/boom") + req(path="/after"))
        rs = responses(t.take())
        assert rs[0][0] == 500 and json.loads(rs[0][2]) == {"error": "internal error"}
        assert b"secret" not in rs[0][2] and b"Traceback" not in rs[0][2]
        assert rs[1][0] == 200 and not t.done

    run(main())


def test_connection_limit_answers_503():
    async def main():
        s = Settings(max_connections=2)
        state = HttpServerState(s, Metrics(), App())
        conns = [HttpProtocol(state) for _ in range(3)]
        ts = [attach(c) for c in conns]
        assert not ts[0].done and not ts[1].done
        (r,) = responses(ts[2].take())
        assert r[0] == 503 and ts[2].closed and len(state.connections) == 2  # no linger: not counted
        assert state.metrics.connections_refused == 1

    run(main())


def test_sweeper_times_out_slow_request_and_idle_connection():
    async def main():
        s = Settings(keepalive_timeout=5.0, request_timeout=2.0)
        state = HttpServerState(s, Metrics(), App())
        sweeper = Sweeper(state)
        slow, idle, busy = (HttpProtocol(state) for _ in range(3))
        t_slow, t_idle, t_busy = attach(slow), attach(idle), attach(busy)
        slow.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n12")  # body never completes
        idle.data_received(req(path="/x"))
        t_idle.take()
        busy.data_received(req(path="/slow"))
        sweeper.sweep(100.0)
        sweeper.sweep(101.0)
        assert not t_slow.done and not t_idle.done
        slow.data_received(b"3")  # trickling bytes does not reset the request clock
        sweeper.sweep(102.5)
        (r,) = responses(t_slow.take())
        assert r[0] == 408 and t_slow.eof and not t_slow.closed
        assert not t_idle.done
        sweeper.sweep(105.5)
        assert t_idle.closed and t_idle.take() == b""  # no answer: nothing to linger for
        assert not t_busy.done  # a request being served is not idle
        state.app.gates[b"/slow"].set()
        await asyncio.sleep(0.01)

    run(main())


def test_eof_after_pipelined_requests_still_answers_them():
    async def main():
        state, app, proto, t = make()
        proto.data_received(req(path="/slow"))
        assert proto.eof_received() is True
        app.gates[b"/slow"].set()
        await asyncio.sleep(0.01)
        (r,) = responses(t.take())
        # the client has ended its side already: nothing can come to linger for
        assert r[0] == 200 and t.closed

    run(main())


def test_after_a_closing_answer_our_side_ends_and_what_still_comes_is_dropped(monkeypatch):
    async def main():
        state, app, proto, t = make(max_body_bytes=100)
        proto.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b"1" * 50)
        (r,) = responses(t.take())
        assert r[0] == 413 and t.eof and not t.closed
        proto.data_received(b"1" * 500)  # read and dropped
        assert t.take() == b"" and app.seen == [] and not t.closed and t.reading
        # shutdown while lingering: nothing more is written (the fake raises on a write after
        # write_eof, as asyncio's transports do); the connection is closed
        proto.shed("shutting down")
        assert t.take() == b"" and t.closed

        # past LINGER_BYTES dropped, it closes
        state, app, proto, t = make(max_body_bytes=100)
        proto.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
        assert t.eof and not t.closed
        proto.data_received(b"1" * HttpProtocol.LINGER_BYTES)
        assert not t.closed
        proto.data_received(b"1")
        assert t.closed

        # and after LINGER_S in any case; the client's end closes it at once
        monkeypatch.setattr(HttpProtocol, "LINGER_S", 0.05)
        state, app, proto, t = make()
        proto.data_received(b"NOT HTTP\r\n\r\n")
        assert t.eof and not t.closed
        await asyncio.sleep(0.2)
        assert t.closed
        state, app, proto, t = make()
        proto.data_received(req(extra="Connection: close\r\n"))
        assert t.eof and not t.closed
        assert proto.eof_received() is None  # None: the transport closes itself

    run(main())


def test_nothing_after_a_closing_request_is_processed_even_behind_a_slow_one():
    async def main():
        state, app, proto, t = make()
        proto.data_received(req(path="/slow") + req("GET", "/last", extra="Connection: close\r\n") + req(path="/never"))
        assert [s[1] for s in app.seen] == [b"/slow", b"/last"]
        app.gates[b"/slow"].set()
        await asyncio.sleep(0.01)
        rs = responses(t.take())
        assert [r[0] for r in rs] == [200, 200] and rs[1][1]["connection"] == "close" and t.done

    run(main())


def test_write_backpressure_pauses_reading():
    async def main():
        state, app, proto, t = make()
        proto.pause_writing()
        assert not t.reading
        proto.resume_writing()
        assert t.reading
        drained = asyncio.ensure_future(proto.flow.drain())
        await asyncio.sleep(0)
        assert drained.done()
        proto.pause_writing()
        drained = asyncio.ensure_future(proto.flow.drain())
        await asyncio.sleep(0)
        assert not drained.done()
        proto.resume_writing()
        await asyncio.wait_for(drained, 1)

    run(main())


def test_pipelined_large_bodies_are_not_mistaken_for_large_headers():
    async def main():
        state, app, proto, t = make(max_header_bytes=1024)
        body = b'{"tokens": [' + b"1, " * 20000 + b'1]}'
        one = [req(path=f"/r{i}", body=body) for i in range(5)]
        # reads that each end 10 bytes into the next request's headers
        data = b"".join(one)
        cuts = [0] + [sum(len(r) for r in one[:i]) + 10 for i in range(1, 5)] + [len(data)]
        for a, b in zip(cuts, cuts[1:]):
            proto.data_received(data[a:b])
        rs = responses(t.take())
        assert [r[0] for r in rs] == [200] * 5 and not t.done

    run(main())


def test_head_answers_have_no_body_and_pipelining_stays_in_step():
    async def main():
        state, app, proto, t = make()
        proto.data_received(req("HEAD", "/x") + req("GET", "/y") + req("HEAD", "/slow1") + req("GET", "/z"))
        await asyncio.sleep(0)
        app.gates[b"/slow1"].set()
        await asyncio.sleep(0.01)
        data = t.take()
        # read the answers as a client that knows which requests were HEAD: a HEAD answer has the
        # Content-Length its GET would have, and no body
        got = []
        for was_head in (True, False, True, False):
            head, _, data = data.partition(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body, data = (b"", data) if was_head else (data[:length], data[length:])
            got.append((head.split(b" ")[1], length, body))
        assert data == b""
        assert got == [
            (b"200", len(json.dumps({"path": "/x", "body": ""})), b""),
            (b"200", len(json.dumps({"path": "/y", "body": ""})), json.dumps({"path": "/y", "body": ""}).encode()),
            (b"200", len(b'{"slow": "/slow1"}'), b""),
            (b"200", len(json.dumps({"path": "/z", "body": ""})), json.dumps({"path": "/z", "body": ""}).encode()),
        ]

    run(main())


def test_100_continue_never_overtakes_an_earlier_response():
    async def main():
        state, app, proto, t = make()
        proto.data_received(req(path="/slow1") + b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        await asyncio.sleep(0)
        assert t.take() == b""  # no 100 ahead of /slow1's answer
        app.gates[b"/slow1"].set()
        await asyncio.sleep(0.01)
        out = t.take()  # /slow1's answer, then the 100 owed to the waiting client
        assert out.endswith(b"HTTP/1.1 100 Continue\r\n\r\n") and json.loads(responses(out[:-25])[0][2]) == {"slow": "/slow1"}
        proto.data_received(b"abc")
        rs = responses(t.take())
        assert [r[0] for r in rs] == [200] and json.loads(rs[0][2])["body"] == "abc"
        # a client that sends its body without waiting is owed nothing
        proto.data_received(req(path="/slow2") + b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi")
        app.gates[b"/slow2"].set()
        await asyncio.sleep(0.01)
        assert b"100 Continue" not in t.take()
        # with nothing queued, the 100 is sent at once
        proto.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n")
        assert t.take() == b"HTTP/1.1 100 Continue\r\n\r\n"

    run(main())


def test_an_error_answer_to_a_head_request_has_no_body_either():
    async def main():
        state, app, proto, t = make(max_header_bytes=256)
        proto.data_received(b"HEAD /x HTTP/1.1\r\nX-Big: " + b"a" * 400 + b"\r\n\r\n")
        out = t.take()
        head, _, rest = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 ") and b"Content-Length: 0" not in head and rest == b""
        assert t.done

    run(main())


def test_requests_still_waiting_after_the_shutdown_grace_get_503():
    """drain(): answers made in time go out; a request whose answer is still awaited, and one
    still arriving, each get a 503 in order (never an empty reply), then the connection closes."""

    async def main():
        state, app, proto, t = make()
        proto.data_received(req(path="/a", body=b"1") + req(path="/slow1") + req(path="/b") + req(path="/slow2"))
        assert [s for s, _, _ in responses(t.take())] == [200]  # /a at once; /b waits behind /slow1
        p2 = HttpProtocol(state)
        half = attach(p2)
        p2.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n123")
        await state.drain([], grace=0.05)
        rs = responses(t.take())
        assert [s for s, _, _ in rs] == [503, 200, 503]
        assert json.loads(rs[0][2])["error"].startswith("the controller is shutting down")
        assert rs[0][1]["retry-after"] == "1" and "connection" not in rs[0][1]
        assert rs[2][1]["connection"] == "close" and t.done
        ((status, headers, _),) = responses(half.take())
        assert status == 503 and headers["connection"] == "close" and half.done
        assert state.metrics.rejected_requests == {503: 3}

    run(main())


@pytest.mark.parametrize("first, says", [
    (b"\x00\x00\x00\x40\x8b\xa1t\xa5hello", "workers report to --monitor-port 9001"),  # our worker's hello
    (b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f", "pull socket 8300 and the reply socket 8400"),  # a ZMQ greeting
])
def test_a_worker_at_the_http_port_is_told_which_port_once(first, says, caplog, monkeypatch):
    from lmcache_rs.controller import http
    from lmcache_rs.log_limit import RepeatLimitedLog

    monkeypatch.setattr(http, "log_wrong_port", RepeatLimitedLog(http.log))  # nothing logged by other tests

    async def main():
        state, app, proto, t = make()
        state.other_ports.update({"monitor": 9001, "pull": 8300, "reply": 8400})
        proto.data_received(first)
        ((status, _, body),) = responses(bytes(t.written))
        assert status == 400 and says in json.loads(body)["error"] and t.closed
        for _ in range(3):  # the worker retries: not logged again
            proto2 = HttpProtocol(state)
            attach(proto2)
            proto2.data_received(first)

    with caplog.at_level("WARNING", logger="lmcache_rs.controller.http"):
        run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and says in lines[0] and "127.0.0.1:50000" in lines[0], lines
