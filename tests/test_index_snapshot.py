"""dump/load: round trips, atomic writes, and files that must be refused without touching the
index (corrupt, truncated, foreign, other format version, other chunk_size/seed)."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from lmcache_rs import Index, SnapshotError, chunk_hashes

CPU, GPU = "LocalCPUBackend", "GPU"


def populated() -> Index:
    ix = Index(chunk_size=4, seed=9)
    ix.register_worker("A", 1)
    ix.admit("A", 0, CPU, tokens=list(range(40)))
    ix.admit("A", 1, CPU, tokens=list(range(24)))
    ix.admit("A", 0, GPU, tokens=list(range(8)))
    ix.admit("B", 3, "remote", hashes=[0, 1, 2**64 - 1])  # key 0 lives in the side slot
    ix.register_worker("C", 0)  # a worker with no holdings
    ix.evict("A", 0, CPU, tokens=list(range(12)))
    return ix


def state(ix: Index) -> Any:
    probes = [list(range(n)) for n in (0, 4, 8, 24, 40)]
    return (
        ix.stats()["chunks"],
        ix.stats()["holdings"],
        ix.holder_counts(),
        ix.workers(),
        [ix.lookup(p) for p in probes],
        [ix.lookup_detailed(p) for p in probes],
    )


def test_round_trip(tmp_path: Path) -> None:
    ix = populated()
    path = tmp_path / "snap.bin"
    ix.dump(path)
    ix2 = Index(chunk_size=4, seed=9)
    ix2.admit("Z", 0, CPU, tokens=[1, 2, 3])  # replaced by the load
    ix2.load(str(path))
    assert state(ix2) == state(ix)
    ix2.check_invariants()
    # the loaded index keeps working
    ix2.admit("A", 1, CPU, tokens=list(range(40)))
    ix.admit("A", 1, CPU, tokens=list(range(40)))
    assert state(ix2) == state(ix)
    # a dump of the loaded index loads back to the same state
    ix.dump(tmp_path / "a")
    ix2.dump(tmp_path / "b")
    ix3 = Index(chunk_size=4, seed=9)
    ix3.load(tmp_path / "b")
    assert state(ix3) == state(ix)
    # no temporary files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "snap.bin"]


def test_empty_round_trip(tmp_path: Path) -> None:
    Index().dump(tmp_path / "e")
    other = Index()
    other.admit("A", 0, CPU, tokens=[1])
    other.load(tmp_path / "e")
    assert len(other) == 0 and other.workers() == {}
    other.check_invariants()


def test_refused_files_leave_index_unchanged(tmp_path: Path) -> None:
    src = populated()
    good = tmp_path / "good"
    src.dump(good)
    data = good.read_bytes()
    target = Index(chunk_size=4, seed=9)
    target.admit("K", 0, GPU, tokens=list(range(16)))
    before = state(target)

    def refused(blob: bytes, match: str) -> None:
        p = tmp_path / "bad"
        p.write_bytes(blob)
        with pytest.raises(SnapshotError, match=match):
            target.load(p)
        assert state(target) == before
        target.check_invariants()

    refused(b"", "not an lmcache_rs index snapshot")
    refused(b"hello world, this is not a snapshot at all, no sir" * 3, "bad magic")
    refused(data[:-1], "truncated|checksum|corrupt")
    refused(data[: len(data) // 2], "truncated|corrupt|checksum")
    refused(data[:60], "truncated|corrupt|too short|checksum")
    refused(data + b"\0", "trailing|checksum|corrupt")
    # flip one byte anywhere: the checksum (or a structural check) catches it
    for pos in range(8, len(data), max(1, len(data) // 40)):
        flipped = bytearray(data)
        flipped[pos] ^= 0x41
        refused(bytes(flipped), "corrupt|checksum|truncated|version|chunk_size|not UTF-8|too short")
    # other format version
    bumped = bytearray(data)
    bumped[8:12] = struct.pack("<I", 99)
    refused(bytes(bumped), "version 99")
    # other chunk_size / seed
    for ix in (Index(chunk_size=8, seed=9), Index(chunk_size=4, seed=0)):
        ix.dump(tmp_path / "other")
        refused((tmp_path / "other").read_bytes(), "chunk_size")
    with pytest.raises(FileNotFoundError):
        target.load(tmp_path / "missing")
    assert state(target) == before


def test_dump_is_atomic(tmp_path: Path) -> None:
    ix = populated()
    path = tmp_path / "snap"
    path.write_bytes(b"old contents")
    ix.dump(path)
    assert path.read_bytes()[:8] == b"LMCRSIDX"
    with pytest.raises(OSError):
        ix.dump(tmp_path / "no-such-dir" / "snap")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]


def test_million_chunk_chain(tmp_path: Path) -> None:
    """A 1M-chunk-deep chain: insert, lookup, dump, load, evict and drop, all iterative."""
    n = 1_000_000
    tokens = bytes(range(256)) * (n * 4 // 256)  # n tokens as LE u32 bytes, chunk_size 1
    ix = Index(chunk_size=1)
    assert ix.admit("A", 0, CPU, tokens=tokens) == n
    assert ix.lookup(tokens) == {"A": (CPU, n)}
    assert ix.stats()["chunks"] == n
    ix.check_invariants()
    ix.dump(tmp_path / "deep")
    ix2 = Index(chunk_size=1)
    ix2.load(tmp_path / "deep")
    assert ix2.lookup(tokens) == {"A": (CPU, n)}
    keys = chunk_hashes(tokens, 1)
    assert ix2.evict("A", 0, CPU, hashes=keys[n // 2 :]) == n - n // 2
    assert ix2.lookup(tokens) == {"A": (CPU, n // 2)}
    assert ix2.remove_worker("A", 0) == n // 2
    assert len(ix2) == 0
    del ix, ix2
    assert os.path.getsize(tmp_path / "deep") > 12 * n


def test_os_errors_name_the_path(tmp_path: Path) -> None:
    """An OS error is raised as Python raises its own: the matching OSError subclass, with
    errno and filename set, so the message says which file."""
    ix = populated()
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as e:
        ix.load(missing)
    assert e.value.errno == errno.ENOENT and e.value.filename == str(missing) and str(missing) in str(e.value)
    target = tmp_path / "no-such-dir" / "snap"
    with pytest.raises(FileNotFoundError) as e:
        ix.dump(target)
    assert e.value.filename == str(target) and str(target) in str(e.value)
    with pytest.raises(IsADirectoryError) as e:
        ix.load(tmp_path)
    assert e.value.filename == str(tmp_path)


def test_log_position_round_trips_and_older_versions_load_with_none(tmp_path: Path) -> None:
    import xxhash

    ix = populated()
    ix.dump(tmp_path / "snap", log_seq=2**64 - 1)
    ix.dump(tmp_path / "plain")
    assert Index(chunk_size=4, seed=9).load(tmp_path / "plain") == 0
    target = Index(chunk_size=4, seed=9)
    assert target.load(tmp_path / "snap") == 2**64 - 1
    assert state(target) == state(ix)
    # the same file as format version 2 wrote it: no log position after the key space
    data = (tmp_path / "plain").read_bytes()
    header = 8 + 4 + 8 + 4 + 8  # magic, version, chunk_size, key space kind and parameter
    body = bytearray(data[:header] + data[header + 8:-8])
    body[8:12] = struct.pack("<I", 2)
    (tmp_path / "v2").write_bytes(bytes(body) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(body))))
    old = Index(chunk_size=4, seed=9)
    assert old.load(tmp_path / "v2") == 0
    assert state(old) == state(ix)
    with pytest.raises(TypeError):
        ix.dump(tmp_path / "bad", log_seq="1")
