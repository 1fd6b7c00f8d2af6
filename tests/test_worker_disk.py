"""LocalDiskBackend: write-behind, read back, persistence across restarts, crash recovery."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.worker import KVWorker, synthetic_kv

CS = 4
SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8)
CHUNK_BYTES = 2 * 2 * 2 * 8 * 2 * CS


def make_config(disk, cpu_slots=16, disk_chunks=64, **extra):
    return config_from_dict(
        {
            "chunk_size": CS,
            "max_local_cpu_size": cpu_slots * CHUNK_BYTES / GB,
            "local_disk": f"file://{disk}",
            "max_local_disk_size": disk_chunks * CHUNK_BYTES / GB,
            **SHAPE,
            **extra,
        }
    )


def prompt(p, n=8):
    return [p * 1000 + i for i in range(n)]


def write(path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def read(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def chunk_dir(worker):
    return worker.kvstore.disk.chunk_dir


def test_write_behind_then_read_back_after_cpu_eviction(tmp_path):
    with KVWorker(make_config(tmp_path, cpu_slots=4)) as w:
        kv = {p: synthetic_kv(prompt(p), **SHAPE) for p in range(6)}
        for p in range(6):
            assert w.store(prompt(p), kv[p]) == 8
            w.flush()
        assert len(w.kvstore.disk.entries) == 12
        assert w.lookup(prompt(0)) == 8 and prompt(0)[0] not in w.kvstore.cpu.entries
        buffer = torch.zeros((2, 2, 8, 2, 8), dtype=kv[0].dtype)
        matched, out = w.retrieve(prompt(0), out=buffer)
        assert matched == 8 and torch.equal(out, kv[0]) and out.data_ptr() == buffer.data_ptr()
        # read back into the pool (promoted)
        assert all(k in w.kvstore.cpu.entries for k in w.chunk_keys(prompt(0)))
        w.kvstore.check()


def test_persistent_across_restart(tmp_path):
    kv = synthetic_kv(prompt(1, 10), **SHAPE)
    with KVWorker(make_config(tmp_path)) as w:
        w.store(prompt(1, 10), kv)
        w.flush()
    files = os.listdir(os.path.join(tmp_path, "lmcache_default_instance.rank0", "chunks"))
    assert len(files) == 3
    with KVWorker(make_config(tmp_path)) as w2:
        assert len(w2.kvstore.disk.entries) == 3 and not w2.kvstore.cpu.entries
        matched, out = w2.retrieve(prompt(1, 10))
        assert matched == 10 and torch.equal(out, kv)
    # another rank of the instance has its own directory
    with KVWorker(make_config(tmp_path, world_size=2), worker_id=1) as w3:
        assert w3.lookup(prompt(1, 10)) == 0


def test_crash_leftovers_are_cleaned_and_torn_index_tolerated(tmp_path):
    kv = synthetic_kv(prompt(2), **SHAPE)
    with KVWorker(make_config(tmp_path)) as w:
        w.store(prompt(2), kv)
        w.flush()
        directory, chunks = w.kvstore.disk.directory, chunk_dir(w)
    # a crash mid-write: a temp file, a file the index never recorded, a torn last line
    write(os.path.join(chunks, "00000000000000aa.kv.tmp"), b"x" * 10)
    write(os.path.join(chunks, "00000000000000bb.kv"), b"y" * CHUNK_BYTES)
    with open(os.path.join(directory, "index.log"), "a") as index:
        index.write('{"op": "put", "key": "00000000000000c')
    with KVWorker(make_config(tmp_path)) as w2:
        assert len(w2.kvstore.disk.entries) == 2
        assert sorted(os.listdir(chunks)) == sorted(f"{k:016x}.kv" for k in w2.kvstore.disk.entries)
        assert torch.equal(w2.retrieve(prompt(2))[1], kv)
    lines = read(os.path.join(directory, "index.log")).decode().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)  # compacted


def test_corrupt_file_is_detected_and_dropped(tmp_path):
    kv = synthetic_kv(prompt(3), **SHAPE)
    with KVWorker(make_config(tmp_path)) as w:
        w.store(prompt(3), kv)
        w.flush()
        keys = w.chunk_keys(prompt(3))
        path = w.kvstore.disk.path_of(keys[1])
    data = bytearray(read(path))
    data[5] ^= 0xFF
    write(path, bytes(data))
    with KVWorker(make_config(tmp_path)) as w2:
        matched, out = w2.retrieve(prompt(3))
        assert matched == 4 and torch.equal(out, kv[:, :, :4])  # stops before the damaged chunk
        assert keys[1] not in w2.kvstore.disk.entries and not os.path.exists(path)


def test_missing_or_short_file_is_dropped_at_start(tmp_path):
    with KVWorker(make_config(tmp_path)) as w:
        w.store(prompt(4), synthetic_kv(prompt(4), **SHAPE))
        w.flush()
        keys = w.chunk_keys(prompt(4))
        os.unlink(w.kvstore.disk.path_of(keys[0]))
        os.truncate(w.kvstore.disk.path_of(keys[1]), 10)
    with KVWorker(make_config(tmp_path)) as w2:
        assert not w2.kvstore.disk.entries


def test_disk_capacity_lru_and_pins(tmp_path):
    with KVWorker(make_config(tmp_path, cpu_slots=4, disk_chunks=4)) as w:
        w.store(prompt(0), synthetic_kv(prompt(0), **SHAPE))
        w.flush()
        w.pin(prompt(0))
        for p in range(1, 5):
            w.store(prompt(p), synthetic_kv(prompt(p), **SHAPE))
            w.flush()
        assert w.kvstore.disk.used_bytes <= 4 * CHUNK_BYTES
        assert all(k in w.kvstore.disk.entries for k in w.chunk_keys(prompt(0)))  # pinned: kept
        assert all(k in w.kvstore.disk.entries for k in w.chunk_keys(prompt(4)))
        assert w.lookup(prompt(2)) == 0


def test_shape_change_discards_old_contents(tmp_path, caplog):
    with KVWorker(make_config(tmp_path)) as w:
        w.store(prompt(5), synthetic_kv(prompt(5), **SHAPE))
        w.flush()
    with KVWorker(make_config(tmp_path, head_dim=4)) as w2:
        assert not w2.kvstore.disk.entries
    assert "discarding" in caplog.text


def test_directory_cannot_be_shared(tmp_path):
    with KVWorker(make_config(tmp_path)):
        with pytest.raises(RuntimeError, match="in use"):
            KVWorker(make_config(tmp_path))


def test_clear_disk_location_only(tmp_path):
    with KVWorker(make_config(tmp_path)) as w:
        w.store(prompt(6), synthetic_kv(prompt(6), **SHAPE))
        w.flush()
        assert w.clear("LocalDiskBackend") == 2
        assert not os.listdir(chunk_dir(w)) and w.lookup(prompt(6)) == 8


def test_local_cpu_false_uses_the_pool_as_staging(tmp_path):
    kv = synthetic_kv(prompt(7), **SHAPE)
    with KVWorker(make_config(tmp_path, local_cpu=False)) as w:
        w.store(prompt(7), kv)
        w.flush()
        assert not w.kvstore.cpu.entries and len(w.kvstore.disk.entries) == 2
        assert "LocalCPUBackend" not in w.kvstore.location_stats()
        assert torch.equal(w.retrieve(prompt(7))[1], kv)
        assert not w.kvstore.cpu.entries


def test_cpu_hits_keep_the_hot_prefix_on_disk(tmp_path):
    # the disk holds 4 chunks; a (2 chunks) then b (2 chunks) fill it
    with KVWorker(make_config(tmp_path, cpu_slots=16, disk_chunks=4)) as w:
        a, b, c = prompt(1), prompt(2), prompt(3)
        for p in (a, b):
            w.store(p, synthetic_kv(p, **SHAPE))
        w.flush()
        assert w.retrieve(a)[0] == 8  # served from the CPU pool: a is the hot prefix
        w.store(c, synthetic_kv(c, **SHAPE))
        w.flush()
        on_disk = set(w.kvstore.disk.entries)
        assert set(w.chunk_keys(a)) <= on_disk  # the disk made room by evicting b, not a
        assert not set(w.chunk_keys(b)) & on_disk


def test_the_index_log_stays_bounded_under_churn_and_survives_a_restart(tmp_path):
    from lmcache_rs.worker import disk_backend

    with KVWorker(make_config(tmp_path, cpu_slots=4, disk_chunks=4)) as w:
        disk = w.kvstore.disk
        for p in range(disk_backend.MIN_COMPACT_RECORDS):  # a put and a del per chunk: churn
            w.store(prompt(p, n=CS), synthetic_kv(prompt(p, n=CS), **SHAPE))
            w.flush()
        with open(disk.index_path, encoding="utf-8") as handle:
            lines = handle.read().count("\n")
        # header + at most MIN_COMPACT_RECORDS appended since the last rewrite + the live chunks
        assert lines <= 1 + disk_backend.MIN_COMPACT_RECORDS + 1 + len(disk.entries), lines
        live = {k: (c.nbytes, c.checksum) for k, c in disk.entries.items()}
        assert len(live) == 4
    with KVWorker(make_config(tmp_path, cpu_slots=4, disk_chunks=4)) as w:
        assert {k: (c.nbytes, c.checksum) for k, c in w.kvstore.disk.entries.items()} == live
        last = prompt(disk_backend.MIN_COMPACT_RECORDS - 1, n=CS)
        assert w.lookup(last) == CS
