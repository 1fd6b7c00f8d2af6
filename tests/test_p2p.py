"""P2P transfer between workers on loopback: exact copies; short, corrupt or refused transfers
store nothing."""

from __future__ import annotations

import socket
import threading

import pytest
import torch
import xxhash

from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.wire.framing import encode_frame, unpack_u64s
from lmcache_rs.worker import KVWorker, synthetic_kv
from lmcache_rs.worker.p2p import FramedSocket, TransferError, fetch

CS = 4
SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8)
CHUNK_BYTES = 2 * 2 * 2 * 8 * 2 * CS
CPU = "LocalCPUBackend"


def make_config(slots=32, p2p=True, **extra):
    values = {"chunk_size": CS, "max_local_cpu_size": slots * CHUNK_BYTES / GB, **SHAPE, **extra}
    if p2p:
        values.update(p2p_host="127.0.0.1", p2p_init_ports=0)
    return config_from_dict(values)


@pytest.fixture
def pair():
    a, b = KVWorker(make_config()), KVWorker(make_config(p2p=False))
    yield a, b
    a.close()
    b.close()


def source_of(worker):
    return ("127.0.0.1", worker.p2p_port)


def test_fetch_copies_chunks_exactly(pair):
    a, b = pair
    tokens = list(range(100, 114))
    kv = synthetic_kv(tokens, **SHAPE)
    a.store(tokens, kv)
    assert fetch(b.kvstore, tokens, source_of(a), CPU) == {"chunks": 4, "tokens": 14}
    matched, out = b.retrieve(tokens)
    assert matched == 14 and torch.equal(out, kv)
    # chunks already held are not fetched again
    assert fetch(b.kvstore, tokens, source_of(a), CPU) == {"chunks": 0, "tokens": 0}
    b.kvstore.check()


def test_fetch_of_a_partly_held_prompt_gets_what_the_peer_has(pair):
    a, b = pair
    tokens = list(range(16))
    a.store(tokens[:8], synthetic_kv(tokens[:8], **SHAPE))
    result = fetch(b.kvstore, tokens, source_of(a), CPU)
    assert result == {"chunks": 2, "tokens": 8}
    assert b.lookup(tokens) == 8
    assert b.kvstore.cpu.free_slots == b.kvstore.cpu.num_slots - 2  # the slots reserved for missing chunks came back


def test_fetch_compressed_and_disk_only_chunks(tmp_path):
    disk = dict(local_disk=str(tmp_path), max_local_disk_size=64 * CHUNK_BYTES / GB)
    a = KVWorker(make_config(slots=2, **disk))
    b = KVWorker(make_config(p2p=False))
    try:
        first, second = list(range(8)), list(range(50, 58))
        kv1, kv2 = synthetic_kv(first, **SHAPE), synthetic_kv(second, **SHAPE)
        a.store(first, kv1)
        a.flush()
        a.store(second, kv2)  # evicts `first` from a's pool: it is on disk only now
        a.compress(second)
        a.flush()
        assert not any(k in a.kvstore.cpu.entries for k in a.chunk_keys(first))
        fetch(b.kvstore, first, source_of(a), CPU)
        fetch(b.kvstore, second, source_of(a), CPU)
        assert torch.equal(b.retrieve(first)[1], kv1) and torch.equal(b.retrieve(second)[1], kv2)
    finally:
        a.close()
        b.close()


def test_fetch_into_the_disk_tier(tmp_path, pair):
    a, _ = pair
    b = KVWorker(make_config(p2p=False, local_disk=str(tmp_path), max_local_disk_size=1e-4))
    try:
        tokens = list(range(30, 38))
        a.store(tokens, synthetic_kv(tokens, **SHAPE))
        assert fetch(b.kvstore, tokens, source_of(a), "LocalDiskBackend")["chunks"] == 2
        assert all(k in b.kvstore.disk.entries for k in b.chunk_keys(tokens))  # on disk when fetch returns
    finally:
        b.close()


def test_unreachable_peer(pair):
    _, b = pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransferError, match="failed"):
        fetch(b.kvstore, [1, 2, 3], ("127.0.0.1", port), CPU)
    assert b.kvstore.cpu.free_slots == b.kvstore.cpu.num_slots


def test_a_failed_fetch_evicts_nothing_from_a_full_pool():
    with KVWorker(make_config(slots=4, p2p=False)) as b:
        held = list(range(16))  # four chunks: the pool is full
        b.store(held, synthetic_kv(held, **SHAPE))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = ("127.0.0.1", s.getsockname()[1])
        with pytest.raises(TransferError, match="failed"):
            fetch(b.kvstore, list(range(500, 516)), dead, CPU)
        assert b.lookup(held) == 16  # room is made only once the bytes are in hand
        b.kvstore.check()


def test_a_fetch_into_a_full_pool_evicts_once_the_bytes_are_in(pair):
    a, _ = pair
    with KVWorker(make_config(slots=4, p2p=False)) as b:
        held, wanted = list(range(16)), list(range(500, 508))
        b.store(held, synthetic_kv(held, **SHAPE))
        a.store(wanted, synthetic_kv(wanted, **SHAPE))
        assert fetch(b.kvstore, wanted, source_of(a), CPU) == {"chunks": 2, "tokens": 8}
        assert b.lookup(wanted) == 8
        assert sum(k in b.kvstore.cpu.entries for k in b.chunk_keys(held)) == 2  # two chunks made room
        assert torch.equal(b.retrieve(wanted)[1], synthetic_kv(wanted, **SHAPE))
        b.kvstore.check()


class EvilPeer:
    """A P2P server that answers one get with whatever the test scripts."""

    def __init__(self, script):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        conn, _ = self.listener.accept()
        with conn:
            framed = FramedSocket(conn, 1 << 20)
            message = framed.read_frame()
            try:
                self.script(conn, message)  # the receiver may hang up early: that is fine
            except OSError:
                return
            try:
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)
            except OSError:
                pass

    def close(self):
        self.thread.join()
        self.listener.close()


def chunk_frames(worker, tokens):
    """(header, data) of the chunks of ``tokens`` as an honest peer would send them."""
    out = []
    for key in worker.chunk_keys(tokens):
        with worker.kvstore.export_chunk(key) as chunk:
            data = bytes(chunk.data)
            out.append(({"t": "chunk", "id": 1, "key": key, "dtype": chunk.dtype, "shape": chunk.shape,
                         "nbytes": chunk.nbytes, "checksum": xxhash.xxh3_64_intdigest(data)}, data))
    return out


@pytest.mark.parametrize("fault", ["checksum", "truncated", "no_end", "wrong_key", "wrong_shape", "error_frame", "oversized"])
def test_bad_transfers_store_nothing(pair, fault):
    a, b = pair
    tokens = list(range(200, 212))
    a.store(tokens, synthetic_kv(tokens, **SHAPE))
    frames = chunk_frames(a, tokens)

    def script(conn, message):
        assert message["t"] == "get" and len(unpack_u64s(message["keys"])) == 3
        for n, (header, data) in enumerate(frames):
            header = dict(header)
            if n == 2 and fault == "checksum":
                data = data[:-1] + bytes([data[-1] ^ 1])
            if n == 2 and fault == "wrong_key":
                header["key"] = 12345
            if n == 2 and fault == "wrong_shape":
                header["shape"] = [2, 2, 3, 2, 8]
            if n == 2 and fault == "error_frame":
                conn.sendall(encode_frame({"t": "error", "code": "busy", "message": "go away"}))
                return
            if n == 2 and fault == "oversized":
                header["nbytes"] = 10 * CHUNK_BYTES
            conn.sendall(encode_frame(header))
            if n == 2 and fault == "truncated":
                conn.sendall(data[: len(data) // 2])
                return
            conn.sendall(data)
        if fault != "no_end":
            conn.sendall(encode_frame({"t": "end", "id": 1, "missing": b""}))

    peer = EvilPeer(script)
    try:
        with pytest.raises(TransferError):
            fetch(b.kvstore, tokens, ("127.0.0.1", peer.port), CPU)
    finally:
        peer.close()
    assert b.lookup(tokens) == 0 and not b.kvstore.cpu.entries
    assert b.kvstore.cpu.free_slots == b.kvstore.cpu.num_slots


def test_server_rejects_malformed_requests(pair):
    a, _ = pair
    with socket.create_connection(source_of(a)) as conn:
        conn.sendall(encode_frame({"t": "put", "id": 1}))
        reply = FramedSocket(conn, 1 << 20).read_frame()
        assert reply["t"] == "error" and reply["code"] == "unknown_type"
        assert conn.recv(1) == b""  # closed
    with socket.create_connection(source_of(a)) as conn:
        conn.sendall((1 << 30).to_bytes(4, "big"))
        reply = FramedSocket(conn, 1 << 20).read_frame()
        assert reply["code"] == "frame_too_large"
    with socket.create_connection(source_of(a)) as conn:
        conn.sendall(encode_frame({"t": "get", "id": 1, "keys": b"123"}))
        assert FramedSocket(conn, 1 << 20).read_frame()["t"] == "error"
    # still serving
    tokens = [1, 2, 3]
    a.store(tokens, synthetic_kv(tokens, **SHAPE))
    with socket.create_connection(source_of(a)) as conn:
        framed = FramedSocket(conn, 1 << 20)
        from lmcache_rs.wire.framing import pack_u64s

        framed.send({"t": "get", "id": 7, "keys": pack_u64s(a.chunk_keys(tokens) + [99])})
        header = framed.read_frame()
        assert header["t"] == "chunk" and header["id"] == 7
        data = bytearray(header["nbytes"])
        assert framed.read_exact(memoryview(data)) == header["nbytes"]
        assert xxhash.xxh3_64_intdigest(bytes(data)) == header["checksum"]
        end = framed.read_frame()
        assert end["t"] == "end" and list(unpack_u64s(end["missing"])) == [99]


def test_a_peer_of_another_dtype_cannot_serve_chunks():
    source = KVWorker(make_config(kv_dtype="bfloat16"))
    sink = KVWorker(make_config(p2p=False))  # float16
    try:
        tokens = list(range(12))
        source.store(tokens, synthetic_kv(tokens, **SHAPE, dtype=torch.bfloat16))
        with pytest.raises(TransferError, match="bfloat16; this worker holds float16"):
            sink.fetch(tokens, source_of(source))
        assert sink.lookup(tokens) == 0 and len(sink.kvstore.cpu.entries) == 0
        sink.kvstore.check()
    finally:
        source.close()
        sink.close()
