"""Session layer: protocol tests over a fake transport, then real loopback connections."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from lmcache_rs.wire import (
    FrameDecoder,
    FrameError,
    RemoteError,
    RequestTimeout,
    Session,
    SessionClosed,
    connect,
    encode_frame,
    serve,
)
from lmcache_rs.wire.framing import _HEADER
from fake_transport import attach


def run(coro):
    return asyncio.run(coro)


def frames(transport) -> list[dict]:
    return FrameDecoder().feed(transport.take())


def command(i, op, args=None):
    return encode_frame({"t": "command", "id": i, "op": op, "args": args or {}})


# -- dispatch -----------------------------------------------------------------------------
def test_sync_handler_replies_and_unknown_op_keeps_connection():
    async def main():
        session = Session({"add": lambda a: a["x"] + a["y"], "boom": lambda a: 1 / 0})
        t = attach(session)
        session.data_received(command(1, "add", {"x": 2, "y": 3}) + command(2, "nope") + command(3, "boom"))
        out = frames(t)
        assert out[0] == {"t": "reply", "id": 1, "ok": True, "result": 5}
        assert out[1]["id"] == 2 and out[1]["ok"] is False and "unknown op 'nope'" in out[1]["error"]
        assert out[2]["id"] == 3 and out[2]["ok"] is False and "ZeroDivisionError" in out[2]["error"]
        assert not t.closed
        session.close()
        await session.wait_closed()

    run(main())


def test_frame_split_across_reads_and_missing_args():
    async def main():
        session = Session({"ping": lambda a: {"args": a}})
        t = attach(session)
        data = encode_frame({"t": "command", "id": 7, "op": "ping"})
        for i in range(len(data)):
            session.data_received(data[i : i + 1])
        assert frames(t) == [{"t": "reply", "id": 7, "ok": True, "result": {"args": {}}}]
        session.close()
        await session.wait_closed()

    run(main())


def test_async_handlers_respect_concurrency_limit_and_pause_reading():
    async def main():
        gate = asyncio.Event()
        running = 0
        peak = 0

        async def slow(args):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1
            return args["i"]

        session = Session({"slow": slow}, max_concurrency=2)
        t = attach(session)
        session.data_received(b"".join(command(i, "slow", {"i": i}) for i in range(1, 7)))
        await asyncio.sleep(0.01)
        assert peak == 2
        assert not t.reading  # 2 running + 4 queued reaches the high-water mark (4)
        gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        out = frames(t)
        assert sorted(m["result"] for m in out) == [1, 2, 3, 4, 5, 6]
        assert all(m["ok"] for m in out)
        assert t.reading and peak == 2
        session.close()
        await session.wait_closed()

    run(main())


def test_handler_timeout_answers_error():
    async def main():
        async def hang(args):
            await asyncio.sleep(10)

        session = Session({"hang": hang}, handler_timeout=0.02)
        t = attach(session)
        session.data_received(command(1, "hang"))
        await asyncio.sleep(0.1)
        (reply,) = frames(t)
        assert reply["ok"] is False and "timed out" in reply["error"]
        session.close()
        await session.wait_closed()

    run(main())


# -- rejected frames ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, code",
    [
        (_HEADER.pack(3) + b"\xc1\xc1\xc1", "bad_msgpack"),
        (_HEADER.pack(1 << 30), "frame_too_large"),
        (encode_frame({"x": 1}), "bad_frame"),
        (_HEADER.pack(1) + b"\x01", "bad_frame"),
        (encode_frame({"t": "bogus"}), "unknown_type"),
        (encode_frame({"t": "command", "id": "1", "op": "x", "args": {}}), "bad_field"),
        (encode_frame({"t": "command", "id": 1, "op": "x", "args": [1]}), "bad_field"),
        (encode_frame({"t": "reply", "id": 1, "ok": 1}), "bad_field"),
    ],
)
def test_bad_frame_gets_error_frame_and_close(data, code):
    async def main():
        calls = []
        session = Session({"x": calls.append}, max_frame_bytes=1 << 20)
        t = attach(session)
        session.data_received(data + command(99, "x"))  # nothing after a bad frame is applied
        out = frames(t)
        assert out[0]["t"] == "error" and out[0]["code"] == code and out[0]["message"]
        assert len(out) == 1 and calls == []
        assert t.closed
        await session.wait_closed()

    run(main())


def test_on_message_gets_other_frames_and_may_reject():
    async def main():
        seen = []

        def on_message(m):
            if m["t"] == "bad":
                raise FrameError("bad_field", "no thanks")
            seen.append(m)

        session = Session(on_message=on_message)
        t = attach(session)
        session.data_received(encode_frame({"t": "hello", "v": 1}) + encode_frame({"t": "bad"}))
        assert seen == [{"t": "hello", "v": 1}]
        (err,) = frames(t)
        assert err == {"t": "error", "code": "bad_field", "message": "no thanks"}
        await session.wait_closed()

    run(main())


# -- calls --------------------------------------------------------------------------------
def test_call_results_errors_and_out_of_order_replies():
    async def main():
        session = Session()
        t = attach(session)
        a = asyncio.ensure_future(session.call("a", {"k": 1}))
        b = asyncio.ensure_future(session.call("b"))
        await asyncio.sleep(0)
        sent = frames(t)
        assert [(m["t"], m["op"], m["args"]) for m in sent] == [("command", "a", {"k": 1}), ("command", "b", {})]
        ida, idb = sent[0]["id"], sent[1]["id"]
        assert ida != idb
        session.data_received(
            encode_frame({"t": "reply", "id": idb, "ok": False, "error": "nope"})
            + encode_frame({"t": "reply", "id": ida, "ok": True, "result": [1, 2]})
            + encode_frame({"t": "reply", "id": 12345, "ok": True, "result": None})  # unknown id: ignored
        )
        assert await a == [1, 2]
        with pytest.raises(RemoteError, match="b: nope"):
            await b
        assert not t.closed
        session.close()
        await session.wait_closed()

    run(main())


def test_call_timeout_then_late_reply_ignored():
    async def main():
        session = Session(request_timeout=0.02)
        t = attach(session)
        with pytest.raises(RequestTimeout):
            await session.call("slow")
        (sent,) = frames(t)
        session.data_received(encode_frame({"t": "reply", "id": sent["id"], "ok": True, "result": 1}))
        assert not t.closed
        session.close()
        await session.wait_closed()

    run(main())


def test_pending_calls_fail_when_connection_drops_and_after_close():
    async def main():
        session = Session()
        attach(session)
        call = asyncio.ensure_future(session.call("x", timeout=None))
        await asyncio.sleep(0)
        session.connection_lost(ConnectionResetError("reset"))
        with pytest.raises(SessionClosed, match="reset"):
            await call
        with pytest.raises(SessionClosed):
            await session.call("y")
        with pytest.raises(SessionClosed):
            session.send({"t": "x"})

    run(main())


def test_max_pending_limits_calls_in_flight():
    async def main():
        session = Session(max_pending=1)
        t = attach(session)
        first = asyncio.ensure_future(session.call("a"))
        second = asyncio.ensure_future(session.call("b"))
        await asyncio.sleep(0.01)
        sent = frames(t)
        assert [m["op"] for m in sent] == ["a"]
        session.data_received(encode_frame({"t": "reply", "id": sent[0]["id"], "ok": True, "result": 1}))
        assert await first == 1
        await asyncio.sleep(0.01)
        (sent_b,) = frames(t)
        assert sent_b["op"] == "b"
        session.data_received(encode_frame({"t": "reply", "id": sent_b["id"], "ok": True, "result": 2}))
        assert await second == 2
        session.close()
        await session.wait_closed()

    run(main())


def test_peer_error_frame_fails_pending_calls():
    async def main():
        session = Session()
        attach(session)
        call = asyncio.ensure_future(session.call("x"))
        await asyncio.sleep(0)
        session.data_received(encode_frame({"t": "error", "code": "config_mismatch", "message": "chunk_size 256 != 128"}))
        with pytest.raises(SessionClosed, match="config_mismatch"):
            await call
        assert session.remote_error == ("config_mismatch", "chunk_size 256 != 128")

    run(main())


# -- real sockets -------------------------------------------------------------------------
def test_loopback_pipelined_calls_both_directions_on_uvloop():
    async def main():
        async def sleepy(args):
            await asyncio.sleep(args["delay"])
            return args["delay"]

        server_sessions: list[Session] = []
        server = await serve(
            "127.0.0.1", 0, {"sleepy": sleepy, "echo": lambda a: a}, on_open=server_sessions.append
        )
        port = server.sockets[0].getsockname()[1]
        client = await connect("127.0.0.1", port, {"whoami": lambda a: "client"})
        results = await asyncio.gather(*(client.call("sleepy", {"delay": d}) for d in (0.05, 0.0, 0.02)))
        assert results == [0.05, 0.0, 0.02]
        big = bytes(range(256)) * 4096
        assert await client.call("echo", {"b": big}) == {"b": big}
        # the server calls back on the same connection
        assert await server_sessions[0].call("whoami") == "client"
        with pytest.raises(RemoteError):
            await client.call("missing")
        client.close()
        await client.wait_closed()
        await server_sessions[0].wait_closed()
        server.close()
        await server.wait_closed()

    uvloop.run(main())


def test_connect_refused_raises_oserror():
    async def main():
        server = await serve("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(OSError):
            await connect("127.0.0.1", port)

    uvloop.run(main())
