"""The report connection against a scripted controller: hello, full sync, events with
sequence numbers, heartbeats, resync, reconnect with backoff, bye."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time

import pytest

from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.wire.framing import encode_frame, unpack_u64s
from lmcache_rs.worker import KVWorker, synthetic_kv
from lmcache_rs.worker.p2p import FramedSocket
from lmcache_rs.wire.report import PROTOCOL_VERSION

CS = 4
SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8)
CHUNK_BYTES = 2 * 2 * 2 * 8 * 2 * CS
CPU = "LocalCPUBackend"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeController:
    """Accepts report connections; records (connection number, frame); answers hello."""

    def __init__(self, port=0, answer=None, read=True):
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.frames: queue.Queue = queue.Queue()
        self.answer = answer or (lambda hello: {"t": "welcome", "v": PROTOCOL_VERSION, "heartbeat_interval": 0.2, "heartbeat_timeout": 3.0})
        self.read = read
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self._closing = False
        self.acceptor = threading.Thread(target=self._accept)
        self.acceptor.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self._closing:
                conn.close()
                return
            self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, len(self.conns)))
            self.threads.append(t)
            t.start()

    def _serve(self, conn, number):
        framed = FramedSocket(conn, 1 << 24)
        try:
            hello = framed.read_frame()
            self.frames.put((number, hello))
            framed.send(self.answer(hello))
            while self.read:
                message = framed.read_frame()
                if message is None:
                    self.frames.put((number, None))
                    return
                self.frames.put((number, message))
            while not self._closing:
                time.sleep(0.02)
        except Exception:
            self.frames.put((number, None))

    def send(self, message):
        self.conns[-1].sendall(encode_frame(message))

    def drop(self):
        self.conns[-1].shutdown(socket.SHUT_RDWR)

    def next(self, kind=None, timeout=5.0, skip=("heartbeat",)):
        deadline = time.monotonic() + timeout
        while True:
            number, message = self.frames.get(timeout=max(0.01, deadline - time.monotonic()))
            if message is None and kind is not None:
                continue  # a connection ended; the caller waits for a frame
            if message is not None and message["t"] in skip and message["t"] != kind:
                continue
            if kind is not None:
                assert message is not None and message["t"] == kind, f"expected {kind}, got {message}"
            return number, message

    def sync(self):
        """Read one full sync; returns (seq, {location: set(keys)})."""
        _, start = self.next("sync_start")
        held: dict[str, set] = {}
        while True:
            _, message = self.next()
            if message["t"] == "sync_end":
                assert message["count"] == sum(len(v) for v in held.values())
                return start["seq"], held
            assert message["t"] == "sync_chunk"
            held.setdefault(message["location"], set()).update(unpack_u64s(message["hashes"]))

    def close(self):
        self._closing = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.acceptor.join()
        for t in self.threads:
            t.join()
        for conn in self.conns:
            conn.close()


def make_config(port, **extra):
    return config_from_dict(
        {"chunk_size": CS, "max_local_cpu_size": 8 * CHUNK_BYTES / GB, **SHAPE,
         "enable_controller": True, "controller_pull_url": f"127.0.0.1:{port}",
         "lmcache_instance_id": "inst-a", "report_interval": 0.01, "lmcache_worker_ports": 0, **extra}
    )


def prompt(p, n=8):
    return [p * 1000 + i for i in range(n)]


@pytest.fixture
def controller():
    c = FakeController()
    yield c
    c.close()


def test_hello_sync_events_heartbeat_bye(controller):
    config = make_config(controller.port, lmcache_worker_ports=0, p2p_init_ports=0, p2p_host="127.0.0.1", world_size=4)
    w = KVWorker(config, worker_id=3)
    try:
        _, hello = controller.next("hello")
        assert hello["v"] == PROTOCOL_VERSION and hello["instance_id"] == "inst-a"
        assert hello["worker_id"] == 3 and hello["world_size"] == 4
        assert hello["chunk_size"] == CS and hello["seed"] == 0
        assert hello["worker_port"] == w.worker_port and hello["p2p_port"] == w.p2p_port
        assert controller.sync() == (0, {})
        keys = w.chunk_keys(prompt(1))
        w.store(prompt(1), synthetic_kv(prompt(1), **SHAPE))
        _, events = controller.next("events")
        assert events["seq"] == 1
        assert [[op, loc, list(unpack_u64s(h))] for op, loc, h in events["ops"]] == [["admit", CPU, keys]]
        w.evict(prompt(1)[:4])
        _, events = controller.next("events")
        assert events["seq"] == 2 and events["ops"][0][:2] == ["evict", CPU]
        _, beat = controller.next("heartbeat")
        assert beat["seq"] == 2
    finally:
        w.close()
    _, bye = controller.next("bye")
    assert bye == {"t": "bye"}


def test_eviction_under_pressure_is_reported(controller):
    w = KVWorker(make_config(controller.port))
    try:
        controller.next("hello")
        controller.sync()
        admitted, evicted = set(), set()
        for p in range(8):  # 16 chunks into 8 slots
            w.store(prompt(p), synthetic_kv(prompt(p), **SHAPE))
        deadline = time.monotonic() + 5
        while len(admitted) - len(evicted) != 8 or len(admitted) != 16:
            assert time.monotonic() < deadline
            _, events = controller.next("events")
            for op, _loc, hashes in events["ops"]:
                (admitted if op == "admit" else evicted).update(unpack_u64s(hashes))
        assert admitted - evicted == set(w.kvstore.cpu.entries)
    finally:
        w.close()


def test_controller_down_then_up_full_sync(tmp_path):
    port = free_port()
    w = KVWorker(make_config(port))
    try:
        started = time.monotonic()
        for p in range(3):
            assert w.store(prompt(p), synthetic_kv(prompt(p), **SHAPE)) == 8  # never waits on the link
        assert time.monotonic() - started < 2
        time.sleep(0.3)  # a few failed attempts
        c = FakeController(port)
        try:
            c.next("hello", timeout=10)
            seq, held = c.sync()
            assert held == {CPU: set(w.kvstore.cpu.entries)} and len(held[CPU]) == 6
        finally:
            c.close()
    finally:
        w.close()


def test_resync_and_reconnect_send_full_syncs(controller):
    w = KVWorker(make_config(controller.port))
    try:
        controller.next("hello")
        controller.sync()
        w.store(prompt(1), synthetic_kv(prompt(1), **SHAPE))
        _, events = controller.next("events")
        controller.send({"t": "resync", "reason": "test"})
        seq, held = controller.sync()
        assert seq == events["seq"] and held == {CPU: set(w.kvstore.cpu.entries)}
        w.store(prompt(2), synthetic_kv(prompt(2), **SHAPE))
        _, after = controller.next("events")
        assert after["seq"] == seq + 1
        controller.drop()
        number, hello = controller.next("hello", skip=("heartbeat", "events"))
        assert number == 2
        seq, held = controller.sync()
        assert held[CPU] == set(w.kvstore.cpu.entries) and len(held[CPU]) == 4
    finally:
        w.close()


def test_refused_hello_is_retried_and_the_worker_keeps_working():
    answers = iter([{"t": "error", "code": "config_mismatch", "message": "chunk_size 4 != 256"}])

    def answer(hello):
        return next(answers, {"t": "welcome", "v": PROTOCOL_VERSION, "heartbeat_interval": 0.2, "heartbeat_timeout": 3.0})

    c = FakeController(answer=answer)
    w = KVWorker(make_config(c.port))
    try:
        c.next("hello")
        assert w.store(prompt(1), synthetic_kv(prompt(1), **SHAPE)) == 8
        number, _ = c.next("hello", skip=("heartbeat",), timeout=10)
        assert number == 2
        _, held = c.sync()
        assert len(held[CPU]) == 2
    finally:
        w.close()
        c.close()



def test_a_hello_refused_again_and_again_is_logged_once(caplog):
    refusals = 4
    answers = iter([{"t": "error", "code": "config_mismatch", "message": "chunk_size 4 != 256"}] * refusals)

    def answer(hello):
        return next(answers, {"t": "welcome", "v": PROTOCOL_VERSION, "heartbeat_interval": 0.2, "heartbeat_timeout": 3.0})

    c = FakeController(answer=answer)
    with caplog.at_level(logging.INFO, logger="lmcache_rs"):
        w = KVWorker(make_config(c.port))
        try:
            for n in range(1, refusals + 2):  # every refused hello is retried, then welcomed
                number, _ = c.next("hello", skip=("heartbeat",), timeout=10)
                assert number == n
        finally:
            w.close()
            c.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "config_mismatch" in r.getMessage()]
    assert len(warnings) == 1, warnings

def test_a_stalled_controller_never_blocks_store():
    c = FakeController(read=False)
    w = KVWorker(make_config(c.port, max_local_cpu_size=256 * CHUNK_BYTES / GB))
    try:
        c.next("hello")
        started = time.monotonic()
        for p in range(400):
            w.store(prompt(p), synthetic_kv(prompt(p), **SHAPE))
        assert w.lookup(prompt(399)) == 8
        assert time.monotonic() - started < 20
    finally:
        w.close()
        c.close()


def test_a_worker_pointed_at_an_http_port_says_so_once(caplog):
    # controller_pull_url naming the controller's HTTP port: every reconnection gets an HTTP answer
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    with caplog.at_level(logging.INFO, logger="lmcache_rs"):
        w = KVWorker(make_config(server.getsockname()[1]))
        try:
            deadline = time.monotonic() + 20
            while len(accepted) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            w.close()
            server.close()
    assert len(accepted) >= 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    said = [m for m in warnings if "speaks HTTP" in m]
    assert len(said) <= 2 and any("(controller_pull_url) refused" in m and "--monitor-port" in m for m in said), warnings
    assert not any("frame of" in m for m in warnings), warnings
