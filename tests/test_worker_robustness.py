"""Worker robustness: foreign or damaged disk chunks, I/O errors, stalled and lying peers."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import socket
import threading
import time
import types

import pytest
import torch
import xxhash

from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.wire.framing import encode_frame
from lmcache_rs.wire.session import RemoteError, serve
from lmcache_rs.wire.session import connect as session_connect
from lmcache_rs.worker import KVWorker, synthetic_kv
from lmcache_rs.worker.disk_backend import LocalDiskBackend
from lmcache_rs.worker.p2p import FramedSocket, TransferError, fetch

CS = 4
SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8)
CHUNK_BYTES = 2 * 2 * 2 * 8 * 2 * CS  # one float16 chunk: one pool slot
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"


def make_config(disk=None, slots=8, **extra):
    values = {"chunk_size": CS, "max_local_cpu_size": slots * CHUNK_BYTES / GB, **SHAPE, **extra}
    if disk is not None:
        values.update(local_disk=f"file://{disk}", max_local_disk_size=64 * CHUNK_BYTES / GB)
    return config_from_dict(values)


def prompt(p, n=CS):
    return [p * 1000 + i for i in range(n)]


def index_lines(worker_dir):
    with open(os.path.join(worker_dir, "index.log"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle.read().splitlines()]


def write_index(worker_dir, lines):
    with open(os.path.join(worker_dir, "index.log"), "w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))


# -- disk tier: chunks that do not fit this worker's slots ----------------------------------------
def test_restart_with_another_kv_dtype_discards_the_disk_contents(tmp_path, caplog):
    """A float32 chunk would not fit a float16 pool's slot: the kv_dtype is in the disk header."""
    with KVWorker(make_config(tmp_path, kv_dtype="float32")) as w:
        w.store(prompt(1), synthetic_kv(prompt(1), **SHAPE, dtype=torch.float32))
        w.flush()
        assert len(w.kvstore.disk.entries) == 1
    with caplog.at_level(logging.WARNING, logger="lmcache_rs.worker"):
        with KVWorker(make_config(tmp_path, kv_dtype="float16")) as w:
            assert not w.kvstore.disk.entries and w.lookup(prompt(1)) == 0
    assert "discarding its contents" in caplog.text


def test_index_header_without_kv_dtype_is_foreign(tmp_path, caplog):
    """An index written before the header carried kv_dtype is discarded (logged), not a crash."""
    with KVWorker(make_config(tmp_path)) as w:
        w.store(prompt(1), synthetic_kv(prompt(1), **SHAPE))
        w.flush()
        directory = w.kvstore.disk.directory
    header, *records = index_lines(directory)
    del header["kv_dtype"]
    write_index(directory, [header, *records])
    with caplog.at_level(logging.WARNING, logger="lmcache_rs.worker"):
        with KVWorker(make_config(tmp_path)) as w:
            assert not w.kvstore.disk.entries and not os.listdir(w.kvstore.disk.chunk_dir)
    assert "discarding its contents" in caplog.text


def test_disk_chunk_larger_than_a_slot_is_dropped_not_copied(tmp_path):
    """A recovered record claiming more bytes than a slot (foreign or damaged index) must never
    be read into the pool: it would overwrite the neighbouring slot, another chunk's data."""
    old = prompt(1)
    with KVWorker(make_config(tmp_path)) as w:
        w.store(old, synthetic_kv(old, **SHAPE))
        w.flush()
        directory, (key,) = w.kvstore.disk.directory, w.chunk_keys(old)
        path = w.kvstore.disk.path_of(key)
    wide = synthetic_kv(old, **SHAPE, dtype=torch.float32).numpy().tobytes()  # two slots' worth
    with open(path, "wb") as handle:
        handle.write(wide)
    header, record = index_lines(directory)
    record.update(dtype="float32", nbytes=len(wide), xxh3=xxhash.xxh3_64_intdigest(wide))
    write_index(directory, [header, record])
    with KVWorker(make_config(tmp_path)) as w:
        assert key in w.kvstore.disk.entries  # the file matches its record, so recovery keeps it
        a, b = prompt(2), prompt(3)
        kv_b = synthetic_kv(b, **SHAPE)
        w.store(a, synthetic_kv(a, **SHAPE))
        w.store(b, kv_b)  # the slot after a's
        w.flush()
        w.evict(a, CPU)  # a's slot is the next one reserved
        assert w.retrieve(old)[0] == 0
        assert key not in w.kvstore.disk.entries
        matched, out = w.retrieve(b)
        assert matched == CS and torch.equal(out, kv_b)
        assert w.kvstore.cpu.free_slots == w.kvstore.cpu.num_slots - len(w.kvstore.cpu.entries)
        w.kvstore.check()


# -- disk tier: I/O errors ----------------------------------------------------------------------
class EioFile(io.FileIO):
    """A chunk file on a bad sector: every read fails with EIO."""

    def readinto(self, buffer):
        raise OSError(errno.EIO, "Input/output error")


def test_disk_read_error_releases_the_slot_and_drops_the_chunk(tmp_path, monkeypatch):
    """EIO while reading a disk chunk ends the match there, like a checksum failure."""
    tokens = prompt(1, 2 * CS)
    with KVWorker(make_config(tmp_path)) as w:
        w.store(tokens, synthetic_kv(tokens, **SHAPE))
        w.flush()
        w.evict(tokens, CPU)
        first, second = w.chunk_keys(tokens)
        monkeypatch.setattr(LocalDiskBackend, "open_chunk", lambda self, key: EioFile(self.path_of(key), "rb"))
        for _ in range(3):
            matched, out = w.retrieve(tokens)
            assert matched == 0 and out.shape[2] == 0
        assert first not in w.kvstore.disk.entries and second in w.kvstore.disk.entries
        assert w.kvstore.cpu.free_slots == w.kvstore.cpu.num_slots and not w.kvstore.cpu.entries
        w.kvstore.check()


def test_failed_disk_write_leaves_no_temp_file(tmp_path, monkeypatch):
    """ENOSPC at fsync: the temp file is removed (it is not counted in the disk's usage)."""
    with KVWorker(make_config(tmp_path)) as w:
        real_fsync = os.fsync

        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_space)
        w.store(prompt(1, 2 * CS), synthetic_kv(prompt(1, 2 * CS), **SHAPE))
        w.flush()
        assert not os.listdir(w.kvstore.disk.chunk_dir) and not w.kvstore.disk.entries
        monkeypatch.setattr(os, "fsync", real_fsync)
        w.store(prompt(2), synthetic_kv(prompt(2), **SHAPE))
        w.flush()
        assert len(w.kvstore.disk.entries) == 1 and len(os.listdir(w.kvstore.disk.chunk_dir)) == 1


# -- compression --------------------------------------------------------------------------------
def test_compress_in_a_full_pool_evicts_nothing():
    """The chunk's own slot is given back before its blob is placed, so no other chunk goes."""
    with KVWorker(make_config(slots=4)) as w:
        prompts = [prompt(p) for p in range(4)]
        zeros = torch.zeros(2, 2, CS, 2, 8, dtype=torch.float16)  # very compressible
        for p in prompts:
            w.store(p, zeros)
        assert w.kvstore.cpu.free_slots == 0
        assert w.compress(prompts[3])["chunks"] == 1
        assert all(w.lookup(p) == CS for p in prompts)
        assert torch.equal(w.retrieve(prompts[3])[1], zeros)
        w.kvstore.check()


# -- P2P ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fstat_lies", [False, True], ids=["short_file", "shrinks_while_sent"])
def test_p2p_truncated_disk_file_fails_at_once_and_is_dropped(tmp_path, monkeypatch, fstat_lies):
    """A disk file shorter than its index entry: the peer's fetch fails at once (not at its
    socket timeout) and the server drops the chunk. ``fstat_lies`` hides the short size from
    the check before the header, so sendfile's count must catch it."""
    a = KVWorker(make_config(tmp_path, p2p_host="127.0.0.1", p2p_init_ports=0))
    b = KVWorker(make_config())
    try:
        tokens = prompt(1)
        a.store(tokens, synthetic_kv(tokens, **SHAPE))
        a.flush()
        a.evict(tokens, CPU)  # disk-only now: sent with sendfile
        (key,) = a.chunk_keys(tokens)
        with open(a.kvstore.disk.path_of(key), "r+b") as handle:
            handle.truncate(CHUNK_BYTES // 2)
        if fstat_lies:
            real_fstat = os.fstat

            def fstat(fd):
                st = real_fstat(fd)
                return types.SimpleNamespace(st_size=CHUNK_BYTES) if st.st_size == CHUNK_BYTES // 2 else st

            monkeypatch.setattr(os, "fstat", fstat)
        started = time.monotonic()
        with pytest.raises(TransferError):
            fetch(b.kvstore, tokens, ("127.0.0.1", a.p2p_port), CPU, timeout=10.0)
        assert time.monotonic() - started < 5.0
        assert not a.kvstore.holds(key) and not b.kvstore.holds(key)
        assert b.kvstore.cpu.free_slots == b.kvstore.cpu.num_slots
    finally:
        b.close()
        a.close()


def test_p2p_chunk_frame_with_a_non_int_key_is_a_transfer_error():
    """A peer-supplied key that is not an int (here unhashable) is refused as TransferError."""
    listener = socket.create_server(("127.0.0.1", 0))

    def peer():
        conn, _ = listener.accept()
        with conn:
            FramedSocket(conn, 1 << 20).read_frame()
            conn.sendall(encode_frame({"t": "chunk", "id": 1, "key": [1, 2], "dtype": "float16",
                                       "shape": [2, 2, CS, 2, 8], "nbytes": CHUNK_BYTES, "checksum": 0}))
            conn.recv(1)  # until the receiver hangs up

    thread = threading.Thread(target=peer)
    thread.start()
    try:
        with KVWorker(make_config()) as w:
            with pytest.raises(TransferError, match="not asked for"):
                fetch(w.kvstore, prompt(1), listener.getsockname(), CPU, timeout=5.0)
            assert w.kvstore.cpu.free_slots == w.kvstore.cpu.num_slots
    finally:
        thread.join()
        listener.close()


# -- command connection -------------------------------------------------------------------------
def test_close_does_not_hang_on_a_peer_that_stopped_reading():
    """close() flushes replies for a moment, then aborts a connection whose peer reads nothing."""
    w = KVWorker(make_config(lmcache_worker_host="127.0.0.1", lmcache_worker_ports=0))
    sock = socket.create_connection(("127.0.0.1", w.worker_port))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"".join(encode_frame({"t": "command", "id": i, "op": "info"}) for i in range(1, 30001)))
        # until replies pile up in the worker's write buffer: that takes the worker answering a
        # few MB of commands, which a busy two-core host has taken more than 20 s to do; the
        # bound only stops a hang
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sessions = w.command_sessions()
            if sessions and sessions[0].transport.get_write_buffer_size() > 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the worker's write buffer never filled")
        closer = threading.Thread(target=w.close, daemon=True)
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "KVWorker.close() hangs while a command peer does not read"
    finally:
        sock.close()
        w.close()


@pytest.mark.parametrize("handler_timeout", [None, 5.0])
def test_handler_raising_timeouterror_is_answered_as_its_error(handler_timeout):
    """Only the session's own handler_timeout is reported as "timed out"; a TimeoutError the
    handler raises (a nested call timing out) is answered like any other error."""

    async def upstream(args):
        raise TimeoutError("upstream did not answer")

    async def main():
        server = await serve("127.0.0.1", 0, {"op": upstream}, handler_timeout=handler_timeout)
        session = await session_connect("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            with pytest.raises(RemoteError) as info:
                await session.call("op", timeout=5.0)
            assert info.value.error == "TimeoutError: upstream did not answer"
        finally:
            session.close()
            server.close()

    asyncio.run(main())
