"""The process-wide cap on request-body bytes being received (--max-buffered-body-bytes), through
HttpProtocol objects sharing one HttpServerState over fake transports: a request that would go
over is answered 503 with Retry-After and closed, and every byte counted is given back when a
request completes, fails or its connection drops (checked against a plain model on random
interleavings)."""

from __future__ import annotations

import asyncio
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from fake_transport import attach
from lmcache_rs.controller.http import JSON, HttpProtocol, HttpServerState
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.settings import Settings


def app(req):
    return (200, JSON, json.dumps({"len": len(req.body)}).encode())


def server(**kw) -> HttpServerState:
    return HttpServerState(Settings(**kw), Metrics(), app)


def connect(state: HttpServerState):
    proto = HttpProtocol(state)
    return proto, attach(proto)


def head(n: int) -> bytes:
    return b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % n


def status_of(data: bytes) -> int | None:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


def test_request_over_the_budget_gets_503_from_its_content_length_and_others_go_on():
    async def main():
        state = server(max_body_bytes=800, max_buffered_body_bytes=1000)
        a, ta = connect(state)
        a.data_received(head(600) + b"x" * 300)
        assert state.buffered_body == 300
        b, tb = connect(state)
        b.data_received(head(600))  # 300 held + 600 announced fits in 1000
        assert tb.take() == b"" and not tb.done
        b.data_received(b"y" * 600)
        assert json.loads(tb.take().split(b"\r\n\r\n", 1)[1]) == {"len": 600}
        c, tc = connect(state)
        c.data_received(head(800))  # 300 held + 800 > 1000
        out = tc.take()
        assert status_of(out) == 503 and b"Retry-After: 1\r\n" in out and tc.done
        assert "server busy" in json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
        assert state.metrics.rejected_requests == {503: 1}
        a.data_received(b"x" * 300)
        assert json.loads(ta.take().split(b"\r\n\r\n", 1)[1]) == {"len": 600} and not ta.done
        assert state.buffered_body == 0
        d, td = connect(state)
        d.data_received(head(800) + b"z" * 800)  # the budget is free again
        assert status_of(td.take()) == 200

    asyncio.run(main())


def test_chunked_body_is_cut_when_the_budget_runs_out_and_a_drop_gives_bytes_back():
    async def main():
        state = server(max_body_bytes=10_000, max_buffered_body_bytes=1000)
        a, ta = connect(state)
        a.data_received(head(900) + b"x" * 700)
        b, tb = connect(state)
        b.data_received(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"200\r\n" + b"y" * 0x200 + b"\r\n")
        assert status_of(tb.take()) == 503 and tb.done
        await asyncio.sleep(0)  # connection_lost runs
        assert state.buffered_body == 700
        ta.close()  # the client goes away mid-body
        await asyncio.sleep(0)
        assert state.buffered_body == 0

    asyncio.run(main())


def test_budget_is_split_over_http_threads():
    state = server(max_buffered_body_bytes=1000, http_threads=4)
    assert state.max_buffered_body == 250


# One action on one of four connections: send some body bytes, drop the connection, or (when
# idle) start a request with a Content-Length.
actions = st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from(["start", "send", "drop"]), st.integers(1, 400)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(actions)
def test_buffered_bytes_match_a_model_on_random_interleavings(steps):
    budget = 1000

    async def main():
        state = server(max_body_bytes=600, max_buffered_body_bytes=budget)
        conns: dict[int, tuple] = {}
        # model: per live connection, (announced length, bytes sent so far)
        model: dict[int, list[int]] = {}
        for k, op, n in steps:
            if k not in conns:
                conns[k] = connect(state)
            proto, t = conns[k]
            if op == "drop" or t.done:
                t.close()
                await asyncio.sleep(0)
                del conns[k]
                model.pop(k, None)
            elif op == "start" and k not in model:
                n = min(n, 600)
                proto.data_received(head(n))
                if sum(sent for _, sent in model.values()) + n > budget:
                    assert status_of(t.take()) == 503 and t.done
                else:
                    model[k] = [n, 0]
            elif op == "send" and k in model:
                length, sent = model[k]
                part = min(n, length - sent)
                proto.data_received(b"b" * part)
                if sent + part == length:
                    out = t.take()
                    assert status_of(out) == 200 and json.loads(out.split(b"\r\n\r\n", 1)[1]) == {"len": length}
                    del model[k]
                else:
                    model[k][1] = sent + part
            assert state.buffered_body == sum(sent for _, sent in model.values()) <= budget
        for _, t in conns.values():
            t.close()
        await asyncio.sleep(0)
        assert state.buffered_body == 0

    asyncio.run(main())
