"""Hostile clients against a real controller process on 127.0.0.1: a 1 GB body, a body that never
ends, slowloris (headers and bodies a byte at a time), thousands of idle connections on both
ports, oversized and never-finished frames. Each is refused or timed out, the controller's RSS
stays bounded, and a well-behaved client keeps being served meanwhile.

The idle-connection tests open 10,000 connections on each port (fewer, and said so, where the
open-files limit cannot be raised that far). Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import resource
import select
import socket
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from soak import Controller, Http, metrics, rss_kb  # noqa: E402

from lmcache_rs.wire import FrameDecoder, encode_frame  # noqa: E402
from lmcache_rs.wire.report import PROTOCOL_VERSION  # noqa: E402

IDLE_CONNECTIONS = 10_000


HTTP_LINGER_S = 2.0  # HttpProtocol.LINGER_S


def run(coro):
    return asyncio.run(coro)


def rss_mb(c: Controller) -> float:
    return rss_kb(c.proc.pid) / 1024


class Served:
    """A well-behaved client looking up in the background; records latencies and errors."""

    def __init__(self, port: int):
        self.port = port
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop = False

    async def run(self) -> None:
        http = await Http(self.port).open()
        try:
            while not self.stop and len(self.latencies) < 100_000:
                t0 = time.perf_counter()
                try:
                    await http.lookup([1, 2, 3, 4] * 8)
                    self.latencies.append(time.perf_counter() - t0)
                except Exception as exc:  # any failure of the well-behaved client is the finding
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    await http.close()
                    http = await Http(self.port).open()
                await asyncio.sleep(0.005)
        finally:
            await http.close()

    def p99_ms(self) -> float:
        lat = sorted(self.latencies)
        return lat[int(0.99 * (len(lat) - 1))] * 1e3 if lat else float("nan")


async def read_response(reader: asyncio.StreamReader, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), timeout)
    return int(lines[0].split()[1]), headers, body


def send_until_answered(port: int, head: bytes, piece: bytes, max_bytes: int, max_s: float = 10.0):
    """Send ``head`` then ``piece`` after ``piece`` until the server answers (or errors, or the
    bounds are hit); then read everything it sent until it closes. A blocking socket: what the
    server sent before resetting the connection is still read (the kernel keeps it queued).
    Returns (body bytes sent, what the server sent, whether it closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    sent = 0
    t0 = time.monotonic()
    try:
        s.sendall(head)
        while sent < max_bytes and time.monotonic() - t0 < max_s:
            if select.select([s], [], [], 0)[0]:
                break  # an answer (or a close) arrived
            s.sendall(piece)
            sent += len(piece)
    except OSError:
        pass
    data = b""
    closed = False
    try:
        while True:
            b = s.recv(65536)
            if not b:
                closed = True
                break
            data += b
    except OSError:
        closed = True
    finally:
        s.close()
    return sent, data, closed


def parse_response(data: bytes) -> tuple[int, dict, bytes]:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    return int(lines[0].split()[1]), headers, rest[: int(headers.get("content-length", 0))]


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
        return True
    except (ConnectionError, OSError):
        return True
    except asyncio.TimeoutError:
        return False


# -- bodies ---------------------------------------------------------------------------------
def test_one_gigabyte_body_is_refused_from_its_length_before_it_is_read(controller):
    c = controller()

    async def main():
        served = Served(c.http_port)
        task = asyncio.ensure_future(served.run())
        await asyncio.sleep(0.2)
        base = rss_mb(c)
        t0 = time.monotonic()
        sent, data, closed = await asyncio.to_thread(  # never more than 64 MiB of the 1 GiB
            send_until_answered, c.http_port,
            b"POST /lookup HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1073741824\r\n\r\n", b"[" * 65536, 64 << 20)
        refused_in = time.monotonic() - t0
        peak = rss_mb(c)
        served.stop = True
        await task
        return parse_response(data), sent, refused_in, closed, peak - base, served

    (status, headers, body), sent, refused_in, closed, grew, served = run(main())
    print(f"\n1 GiB declared: {status} after {sent / 2**20:.1f} MiB sent ({refused_in * 1e3:.0f} ms); "
          f"controller RSS +{grew:.1f} MB; other client: {len(served.latencies)} lookups, p99 {served.p99_ms():.2f} ms")
    assert status == 413 and headers.get("connection") == "close"
    assert "exceeds" in json.loads(body)["error"]
    assert closed
    assert grew < 32
    assert served.errors == [] and len(served.latencies) > 10


def test_expect_continue_with_a_huge_length_gets_413_and_no_100(controller):
    c = controller()

    async def main():
        reader, writer = await asyncio.open_connection("127.0.0.1", c.http_port)
        writer.write(b"POST /lookup HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1073741824\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        writer.close()
        return head

    assert run(main()).startswith(b"HTTP/1.1 413")


def test_a_refused_body_still_arriving_is_dropped_and_the_answer_is_not_lost(controller):
    # The 413 goes out as soon as Content-Length is read; the client goes on sending the body.
    # The server reads and drops what still comes (it never resets the connection, which can
    # destroy the answer unread), closes as soon as the client ends its side, and bounds what
    # it drops (16 MiB) and how long it waits (2 s).
    c = controller("--max-body-bytes", str(1 << 20))
    head = b"POST /lookup HTTP/1.1\r\nHost: a\r\nContent-Length: 1073741824\r\n\r\n"

    def open_connections() -> float:  # (the scrape's own connection included)
        return run(metrics(c.http_port))["lmcache_http_connections"]

    def send_after_answer(s: socket.socket, n: int) -> tuple[bytes, int]:
        s.sendall(head)
        answer = s.recv(65536)
        sent = 0
        for _ in range(n // 65536):
            try:
                s.sendall(b"1" * 65536)
            except OSError:
                break
            sent += 65536
        return answer, sent

    # 4 MiB after the answer: every byte taken while the connection stays open; the client's
    # end closes it (well before the linger time)
    alone = open_connections()
    s = socket.create_connection(("127.0.0.1", c.http_port), timeout=10)
    try:
        answer, sent = send_after_answer(s, 4 << 20)
        assert answer.startswith(b"HTTP/1.1 413 ") and b"exceeds" in answer
        assert sent == 4 << 20 and open_connections() == alone + 1
        s.shutdown(socket.SHUT_WR)
        assert s.recv(65536) == b""
        t0 = time.monotonic()
        while open_connections() > alone and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        closed_in = time.monotonic() - t0
    finally:
        s.close()
    assert closed_in < HTTP_LINGER_S / 2
    # a client that never ends its side: still read after the answer and its end (FIN), and
    # closed after the linger time (then its next bytes meet a reset)
    s = socket.create_connection(("127.0.0.1", c.http_port), timeout=10)
    try:
        s.sendall(head)
        assert s.recv(65536).startswith(b"HTTP/1.1 413 ")
        assert s.recv(65536) == b""  # the server's end: nothing more comes
        t0 = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - t0 < 30:
                s.sendall(b"1")
                time.sleep(0.05)
        cut_after = time.monotonic() - t0
    finally:
        s.close()
    assert HTTP_LINGER_S / 2 <= cut_after < 10
    # past 16 MiB of dropped bytes the server stops reading them and closes (long before the
    # client has sent 64 MiB)
    s = socket.create_connection(("127.0.0.1", c.http_port), timeout=10)
    try:
        answer, sent = send_after_answer(s, 64 << 20)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 413 ") and 16 << 20 <= sent < 64 << 20


def test_endless_chunked_body_is_cut_at_the_limit_and_memory_stays_bounded(controller):
    c = controller("--max-body-bytes", str(1 << 20))

    async def main():
        base = rss_mb(c)
        sent, data, _ = await asyncio.to_thread(
            send_until_answered, c.http_port, b"POST /lookup HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"10000\r\n" + b" " * 0x10000 + b"\r\n", 16 << 20)
        status, _, body = parse_response(data)
        return status, body, sent, rss_mb(c) - base

    status, body, sent, grew = run(main())
    print(f"\nchunked body without end: {status} after {sent / 2**20:.1f} MiB sent; RSS +{grew:.1f} MB")
    assert status == 413 and "exceeds" in json.loads(body)["error"]
    assert grew < 16



def test_many_half_sent_bodies_are_capped_in_all_and_others_are_served(controller):
    # 128 clients each announce 1 MiB and send 896 KiB of it, then stall: without the process-wide
    # cap the controller would hold 112 MiB; with an 8 MiB cap the rest get 503 at their headers.
    c = controller("--max-buffered-body-bytes", str(8 << 20), "--max-body-bytes", str(2 << 20), "--request-timeout", "20")
    n, length, part = 128, 1 << 20, 14 * 65536

    async def half_sent():
        """(held, reader, writer): held when ``part`` bytes went in and no answer came back."""
        reader, writer = await asyncio.open_connection("127.0.0.1", c.http_port)
        writer.write(b"POST /lookup HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % length)
        try:
            for _ in range(part // 65536):
                writer.write(b" " * 65536)
                await writer.drain()
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    return False, reader, writer  # answered (503) before the body was in
            await asyncio.wait_for(reader.read(1), 0.3)
            return False, reader, writer
        except asyncio.TimeoutError:
            return True, reader, writer
        except (ConnectionError, OSError):
            return False, reader, writer  # refused and reset while sending

    async def main():
        served = Served(c.http_port)
        task = asyncio.ensure_future(served.run())
        await asyncio.sleep(0.2)
        base = rss_mb(c)
        clients = [await half_sent() for _ in range(n)]
        peak = rss_mb(c) - base
        held = [cl for cl in clients if cl[0]]
        busy = (await metrics(c.http_port)).get('lmcache_rejected_requests_total{status="503"}', 0)
        # the held ones finish their bodies: each gets a 400 (spaces are not JSON), and the budget frees
        for _, _, writer in held:
            writer.write(b" " * (length - part))
        finished = [(await read_response(reader))[0] for _, reader, _ in held]
        # with the budget free again, a full 1 MiB body is received and answered
        http = await Http(c.http_port).open()
        status, _ = await http.request("POST", "/lookup", b'{"tokens": [1, 2, 3]}' + b" " * (length - 21))
        await http.close()
        for _, _, writer in clients:
            writer.close()
        served.stop = True
        await task
        return int(busy), len(held), finished, status, peak, served

    busy, held, finished, status, grew, served = run(main())
    print(f"\n{n} half-sent 1 MiB bodies, 8 MiB cap: {held} held, {busy} refused 503; controller RSS +{grew:.1f} MB; "
          f"other client: {len(served.latencies)} lookups, p99 {served.p99_ms():.2f} ms")
    assert held + busy == n and 1 <= held <= 9 and busy >= n - 9
    assert finished == [400] * held
    assert status == 200
    assert grew < 40
    assert served.errors == [] and len(served.latencies) > 10


# -- slow clients ---------------------------------------------------------------------------
def test_slowloris_headers_and_bodies_time_out_while_others_are_served(controller):
    timeout = 1.5
    c = controller("--request-timeout", str(timeout))
    n = 200

    async def slow(kind: str) -> tuple[float, int | None]:
        reader, writer = await asyncio.open_connection("127.0.0.1", c.http_port)
        if kind == "head":
            writer.write(b"POST /lookup HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        else:
            writer.write(b"POST /lookup HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n{\"tokens\": [")
        t0 = time.monotonic()
        status = None
        try:
            for _ in range(int(4 * timeout / 0.25)):  # a byte every 250 ms, bounded
                await asyncio.sleep(0.25)
                writer.write(b"a" if kind == "head" else b"1")
                await writer.drain()
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 3)
            status = int(head.split()[1])
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
        return time.monotonic() - t0, status

    async def main():
        served = Served(c.http_port)
        task = asyncio.ensure_future(served.run())
        results = await asyncio.gather(*(slow("head" if i % 2 else "body") for i in range(n)))
        served.stop = True
        await task
        return results, served

    results, served = run(main())
    times = sorted(t for t, _ in results)
    statuses = {s for _, s in results}
    print(f"\nslowloris x{n}: statuses {statuses}, cut after {times[0]:.2f}-{times[-1]:.2f} s "
          f"(request timeout {timeout} s); other client: {len(served.latencies)} lookups, "
          f"p99 {served.p99_ms():.2f} ms, errors {len(served.errors)}")
    # every slow client was cut with 408 (one never cut would have no status: its bounded
    # trickle ends after 4 timeouts), none long before its request timeout, and the fast client
    # was served throughout without an error
    assert statuses == {408}
    assert times[0] >= timeout / 2  # (the server starts its clock at accept, a little before ours)
    assert served.errors == [] and len(served.latencies) > 0


# -- idle connections -----------------------------------------------------------------------
def _connections(wanted: int) -> int:
    """Raise the open-files soft limit (the controller subprocess inherits it) and return how
    many connections it allows, at most ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, wanted + 512) if hard != resource.RLIM_INFINITY else wanted + 512
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    n = min(wanted, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 512)
    if n < wanted:
        print(f"\nopen-files limit allows {n} of {wanted} connections")
    if n < 1000:
        pytest.skip(f"open-files limit too low for this test ({n + 512})")
    return n


async def count_refused(socks: list[socket.socket], refusal, wanted: int, deadline: float) -> int:
    """How many of ``socks`` have received a refusal (``refusal(data)``, read without consuming
    it), waiting until ``wanted`` have or ``deadline`` (monotonic) passes: the answers come as
    fast as the machine allows, never after a fixed sleep."""
    refused: set[int] = set()
    while len(refused) < wanted and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            if i in refused:
                continue
            try:
                data = s.recv(65536, socket.MSG_PEEK)
            except OSError:  # BlockingIOError included: nothing yet
                continue
            if refusal(data):
                refused.add(i)
        await asyncio.sleep(0.05)
    return len(refused)


def test_idle_http_connections_are_refused_over_the_limit_and_timed_out(controller):
    n = _connections(IDLE_CONNECTIONS)
    keepalive = 3.0
    max_conn = min(4096, n // 2)
    c = controller("--keepalive-timeout", str(keepalive), "--max-connections", str(max_conn))

    async def main():
        served = Served(c.http_port)  # connected before the flood
        task = asyncio.ensure_future(served.run())
        await asyncio.sleep(0.2)
        base = rss_mb(c)
        socks = []
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        for _i in range(n):
            s = socket.socket()
            s.setblocking(False)
            try:
                await loop.sock_connect(s, ("127.0.0.1", c.http_port))
            except OSError:
                s.close()
                break
            socks.append(s)
        opened = time.monotonic() - t0
        await asyncio.sleep(0.5)
        peak = rss_mb(c)
        # refused ones get a 503 and are closed at once; wait for the answers (however busy
        # the machine), but not past the keep-alive timeout, which closes the held ones too
        refused = await count_refused(socks, lambda data: data.startswith(b"HTTP/1.1 503"), n - max_conn - 1,
                                      t0 + opened + keepalive - 0.5)
        held = len(socks) - refused
        latencies_during = len(served.latencies)
        # the held ones are closed once idle for the keep-alive timeout
        deadline = time.monotonic() + keepalive + 30
        open_left = held
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            open_left = 0
            for s in socks:
                try:
                    if s.recv(1, socket.MSG_PEEK) == b"":
                        continue
                except BlockingIOError:
                    open_left += 1
                except OSError:
                    pass
            if open_left == 0:
                break
        closed_after = time.monotonic() - t0 - opened
        for s in socks:
            s.close()
        # a new client after the flood is served
        fresh = await Http(c.http_port).open()
        await fresh.lookup([1, 2, 3])
        await fresh.close()
        served.stop = True
        await task
        return len(socks), opened, refused, held, open_left, closed_after, peak - base, served, latencies_during

    count, opened, refused, held, open_left, closed_after, grew, served, during = run(main())
    print(f"\n{count} idle HTTP connections in {opened:.2f} s: {held} held, {refused} refused with 503 "
          f"(limit {max_conn}); all closed {closed_after:.1f} s later (keep-alive {keepalive} s); "
          f"RSS +{grew:.1f} MB; the earlier client: {len(served.latencies)} lookups, p99 {served.p99_ms():.2f} ms")
    assert count == n
    assert held <= max_conn and refused >= n - max_conn - 1
    assert open_left == 0
    assert grew < 0.02 * n  # ~20 KB per connection at most
    assert served.errors == [] and len(served.latencies) > 0


def test_idle_monitor_connections_are_refused_over_the_limit_and_dropped_after_the_hello_timeout(controller):
    n = _connections(IDLE_CONNECTIONS)
    # long enough that every connection is open before the first ones time out, however slowly
    # a busy machine accepts them (else a slot freed early takes one that would be refused)
    hello_timeout = 5.0
    limit = 1024  # the default --max-monitor-connections
    c = controller("--hello-timeout", str(hello_timeout))

    async def main():
        base = rss_mb(c)
        loop = asyncio.get_running_loop()
        socks = []
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", c.monitor_port))
            socks.append(s)
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        peak = rss_mb(c)
        # those over the limit are refused at once, the others dropped at the hello timeout
        # with another code: wait for the refusals however busy the machine is (told apart by
        # their code, not by when they come)
        def too_many(data: bytes) -> bool:
            whole = len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big")
            return whole and FrameDecoder().feed(data)[0].get("code") == "too_many_connections"

        refused = await count_refused(socks, too_many, n - limit, t0 + hello_timeout + 30)
        deadline = time.monotonic() + hello_timeout + 30
        open_left = n
        while time.monotonic() < deadline and open_left:
            await asyncio.sleep(0.25)
            open_left = 0
            for s in socks:
                try:
                    s.recv(65536)
                except BlockingIOError:
                    open_left += 1
                except OSError:
                    pass
        dropped_after = time.monotonic() - t0
        for s in socks:
            s.close()
        # the slots are free again: a worker's hello is welcomed
        reader, writer = await asyncio.open_connection("127.0.0.1", c.monitor_port)
        writer.write(encode_frame(_hello()))
        header = await asyncio.wait_for(reader.readexactly(4), 5)
        (welcome,) = FrameDecoder().feed(header + await reader.readexactly(int.from_bytes(header, "big")))
        writer.close()
        return refused, welcome, open_left, dropped_after, peak - base

    refused, welcome, open_left, dropped_after, grew = run(main())
    print(f"\n{n} monitor connections without hello: {refused} refused at once (limit {limit}), the rest dropped "
          f"within {dropped_after:.1f} s of the last one opening (hello timeout {hello_timeout} s); RSS +{grew:.1f} MB; then a worker's hello "
          f"is welcomed")
    assert refused == n - limit
    assert open_left == 0
    assert welcome["t"] == "welcome"
    assert grew < 0.02 * n


# -- frames ---------------------------------------------------------------------------------
def test_monitor_frame_declaring_a_gigabyte_is_refused_at_once(controller):
    c = controller()

    async def main():
        reader, writer = await asyncio.open_connection("127.0.0.1", c.monitor_port)
        writer.write((1 << 30).to_bytes(4, "big") + b"\x80" * 1000)
        header = await asyncio.wait_for(reader.readexactly(4), 5)
        (error,) = FrameDecoder().feed(header + await reader.readexactly(int.from_bytes(header, "big")))
        closed = await closed_by_server(reader, 5)
        writer.close()
        return error, closed

    error, closed = run(main())
    assert error["t"] == "error" and error["code"] == "frame_too_large"
    assert closed


def _hello() -> dict:
    return {"t": "hello", "v": PROTOCOL_VERSION, "instance_id": "big", "worker_id": 0, "world_size": 1, "host": "127.0.0.1", "worker_port": 1,
            "p2p_host": "127.0.0.1", "p2p_port": 1, "chunk_size": 16, "seed": 0}


def test_strangers_cannot_make_the_controller_buffer_large_frames(controller):
    """Before a hello is accepted a frame may be at most --max-hello-frame-bytes (64 KiB): 16
    unauthenticated connections each announcing 60 MiB are refused at the 4-byte header, not after
    buffering ~1 GB. After the hello, full-size frames are fine."""
    c = controller()
    n, size = 16, 60 << 20

    def stranger() -> tuple[str | None, int]:
        s = socket.create_connection(("127.0.0.1", c.monitor_port), timeout=5)
        sent = 0
        try:
            s.sendall(size.to_bytes(4, "big"))
            chunk = b"\0" * (1 << 20)
            while sent < 8 << 20:  # bounded: at most 8 MiB of the announced 60
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        data = b""
        try:
            while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
                b = s.recv(65536)
                if not b:
                    break
                data += b
        except OSError:
            pass
        s.close()
        frames = FrameDecoder().feed(data) if len(data) >= 4 else []
        return (frames[0].get("code") if frames else None), sent

    async def main():
        base = rss_mb(c)
        results = await asyncio.gather(*(asyncio.to_thread(stranger) for _ in range(n)))
        grew = rss_mb(c) - base
        # a worker, once welcomed, sends a 2 MiB sync chunk
        reader, writer = await asyncio.open_connection("127.0.0.1", c.monitor_port)
        keys = bytes(range(256)) * (8 << 10)
        writer.write(encode_frame(_hello()) + encode_frame({"t": "sync_start", "seq": 0})
                     + encode_frame({"t": "sync_chunk", "location": "GPU", "hashes": keys})
                     + encode_frame({"t": "sync_end", "count": len(keys) // 8}) + encode_frame({"t": "ping", "id": 1}))
        decoder, got = FrameDecoder(), []
        while not any(m["t"] in ("pong", "error") for m in got):
            got += decoder.feed(await asyncio.wait_for(reader.read(65536), 5))
        writer.close()
        return results, grew, got

    results, grew, got = run(main())
    print(f"\n{n} strangers announcing {size >> 20} MiB frames: codes {sorted({r for r, _ in results})}, "
          f"at most {max(s for _, s in results) >> 20} MiB sent each before the refusal; RSS +{grew:.1f} MB")
    assert {code for code, _ in results} == {"frame_too_large"}
    assert grew < 16
    assert [m["t"] for m in got] == ["welcome", "pong"]


def test_monitor_connections_over_the_limit_are_refused(controller):
    c = controller("--max-monitor-connections", "50")

    async def main():
        loop = asyncio.get_running_loop()
        socks = []
        for _ in range(80):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", c.monitor_port))
            socks.append(s)
        await asyncio.sleep(0.5)
        refused = 0
        for s in socks:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            if data and FrameDecoder().feed(data)[0].get("code") == "too_many_connections":
                refused += 1
        for s in socks[:40]:
            s.close()
        await asyncio.sleep(0.3)
        reader, writer = await asyncio.open_connection("127.0.0.1", c.monitor_port)
        writer.write(encode_frame(_hello()))
        header = await asyncio.wait_for(reader.readexactly(4), 5)
        (answer,) = FrameDecoder().feed(header + await reader.readexactly(int.from_bytes(header, "big")))
        writer.close()
        for s in socks[40:]:
            s.close()
        return refused, answer

    refused, answer = run(main())
    assert refused == 30
    assert answer["t"] == "welcome"


def test_http_connections_dropped_mid_request_leave_nothing_behind(controller):
    """200 clients vanish halfway through a request (FIN or RST, in the headers or the body):
    the controller forgets every one of them at once and keeps answering."""
    c = controller()
    full = (b"POST /lookup HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n"
            b'{"tokens": [1, 2, 3, 4, 5, 6]}')

    def vanish(i: int) -> None:
        s = socket.create_connection(("127.0.0.1", c.http_port), timeout=5)
        s.sendall(full[: 5 + (i * 37) % (len(full) - 6)])
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        s.close()

    async def connections() -> int:
        http = await Http(c.http_port).open()
        try:
            status, body = await http.request("GET", "/metrics")
        finally:
            await http.close()
        line = next(x for x in body.decode().splitlines() if x.startswith("lmcache_http_connections "))
        return int(float(line.split()[1]))

    async def main():
        await asyncio.gather(*(asyncio.to_thread(vanish, i) for i in range(200)))
        deadline = time.monotonic() + 5
        while (left := await connections()) > 1 and time.monotonic() < deadline:  # 1: the /metrics request
            await asyncio.sleep(0.05)
        http = await Http(c.http_port).open()
        answer = await http.lookup([1, 2, 3])
        await http.close()
        return left, answer

    left, answer = run(main())
    assert left == 1 and answer == {}
    assert c.alive() and c.errors_logged() == []
