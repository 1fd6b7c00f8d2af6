"""LocalDiskBackend: chunks as files, with an append-only index, kept across restarts.

Layout of ``<local_disk>/<instance>.rank<worker>/``::

    LOCK            flock'ed while a worker uses the directory (two workers cannot share it)
    index.log       JSON lines: a header, then {"op": "put", ...} / {"op": "del", ...} records
    chunks/<key>.kv raw bytes of one chunk (key as 16 hex digits)

Crash safety: a chunk file is written to ``<key>.kv.tmp``, fsync'ed, renamed, and only then
its ``put`` record is appended to the index (and flushed). So the index never names a file
that was not completely written. At start the index is replayed (a torn last line is
ignored), records whose file is missing or of the wrong size are dropped, files the index
does not name (a crash between rename and record, or leftovers) are deleted, and the index is
rewritten compacted (temp file, fsync, rename), as it is whenever the records appended since
outnumber the live chunks 3 to 1, so churn cannot grow it without bound. Every record carries the xxh3-64 checksum of
its data, checked on every read: a damaged file is dropped, never returned.

A header that does not match this worker (chunk size, hash seed, model shape, kv_dtype) means
the chunk keys, layouts or slot size differ: the old contents are discarded with a warning. So
is an index whose header lacks a field (written by an older version).

Locking: metadata methods are called with the worker's lock held; file writes and reads of
chunk data are done outside it by the caller.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import xxhash

from .lru import LruEntries

log = logging.getLogger("lmcache_rs.worker")

NAME = "LocalDiskBackend"
FORMAT_VERSION = 1
_KEY_FILE = re.compile(r"^[0-9a-f]{16}\.kv$")


@dataclass(eq=False)
class DiskChunk:
    key: int
    ntokens: int
    dtype: str
    nbytes: int
    checksum: int


class LocalDiskBackend(LruEntries[DiskChunk]):
    name = NAME

    def __init__(self, directory: str, capacity_bytes: int, header: dict[str, Any], fsync: bool = True):
        super().__init__()
        self.directory = directory
        self.capacity = capacity_bytes
        self.header = {"v": FORMAT_VERSION, **header}
        self.fsync = fsync
        self.chunk_dir = os.path.join(directory, "chunks")
        self.index_path = os.path.join(directory, "index.log")
        self.used_bytes = 0
        self.index_records = 0  # records appended since the index was last rewritten
        os.makedirs(self.chunk_dir, exist_ok=True)
        self._lock_file = open(os.path.join(directory, "LOCK"), "a+")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise RuntimeError(f"disk tier {directory!r} is in use by another worker") from None
        self._index = None
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None  # type: ignore[assignment]

    def path_of(self, key: int) -> str:
        return os.path.join(self.chunk_dir, f"{key:016x}.kv")

    # -- start: replay, reconcile, compact ----------------------------------------------------
    def _recover(self) -> None:
        records: dict[int, DiskChunk] = {}
        valid_header = False
        if os.path.exists(self.index_path):
            with open(self.index_path, encoding="utf-8", errors="replace") as handle:
                lines = handle.read().split("\n")
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    if number < len(lines) - 2:
                        log.warning("disk tier: skipping damaged index line %d", number + 1)
                    continue
                if number == 0:
                    valid_header = record == self.header
                    if not valid_header:
                        log.warning(
                            "disk tier %s was written for %s, this worker is %s: discarding its contents",
                            self.directory, record, self.header,
                        )
                        break
                    continue
                self._replay(record, records)
        ordered = list(records.values())
        self.entries = {}
        for chunk in ordered:
            path = self.path_of(chunk.key)
            try:
                size = os.path.getsize(path)
            except OSError:
                continue
            if size != chunk.nbytes:
                continue
            self.entries[chunk.key] = chunk
        # delete files the index does not name, and leftovers
        for name in os.listdir(self.chunk_dir):
            if _KEY_FILE.match(name) and int(name[:16], 16) in self.entries:
                continue
            try:
                os.unlink(os.path.join(self.chunk_dir, name))
            except OSError:
                pass
        self.used_bytes = sum(c.nbytes for c in self.entries.values())
        self.lru = collections.OrderedDict((k, None) for k in self.entries)
        self._rewrite_index()
        if self.entries:
            log.info("disk tier %s: %d chunks (%d bytes) recovered", self.directory, len(self.entries), self.used_bytes)
        # Over capacity after a restart with a smaller size: drop the oldest.
        while self.used_bytes > self.capacity and self.lru:
            self.remove(next(iter(self.lru)))

    @staticmethod
    def _replay(record: Any, records: dict[int, DiskChunk]) -> None:
        try:
            key = int(record["key"], 16)
            if record["op"] == "put":
                records.pop(key, None)
                records[key] = DiskChunk(
                    key, int(record["n"]), str(record["dtype"]), int(record["nbytes"]), int(record["xxh3"])
                )
            elif record["op"] == "del":
                records.pop(key, None)
        except (KeyError, TypeError, ValueError):
            log.warning("disk tier: skipping malformed index record %r", record)

    def _rewrite_index(self) -> None:
        tmp = self.index_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(self.header, sort_keys=True) + "\n")
            for chunk in self.entries.values():
                handle.write(_put_record(chunk) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.index_path)
        _fsync_dir(self.directory)
        self._index = open(self.index_path, "a", encoding="utf-8")
        self.index_records = 0

    # -- data (no lock needed) ----------------------------------------------------------------
    def write_file(self, key: int, data: memoryview | bytes) -> int:
        """Write a chunk's bytes durably to its file; returns the xxh3-64 checksum."""
        path = self.path_of(key)
        tmp = path + ".tmp"
        checksum = xxhash.xxh3_64_intdigest(data)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            # a failed write (ENOSPC, EIO) must not leave an uncounted temp file filling the disk
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return checksum

    def open_chunk(self, key: int):
        """Open the file of a chunk (call with the lock held: a later delete keeps it readable)."""
        return open(self.path_of(key), "rb")

    @staticmethod
    def read_into(handle, chunk: DiskChunk, out: memoryview) -> bool:
        """Fill ``out`` from an open chunk file; False when unreadable (EIO...), short or the
        checksum fails."""
        try:
            with handle:
                got = handle.readinto(out)
        except OSError as exc:
            log.warning("disk tier: reading chunk %016x failed: %s", chunk.key, exc)
            return False
        if got != chunk.nbytes:
            return False
        return xxhash.xxh3_64_intdigest(out) == chunk.checksum

    # -- metadata (lock held) -----------------------------------------------------------------
    def make_room(self, nbytes: int, protect, evicted: list[int]) -> bool:
        """Evict LRU chunks until ``nbytes`` more fit; False when it cannot."""
        if nbytes > self.capacity:
            return False
        while self.used_bytes + nbytes > self.capacity:
            victim = next((k for k in self.lru if k not in protect), None)
            if victim is None:
                return False
            self.remove(victim)
            evicted.append(victim)
        return True

    def commit(self, chunk: DiskChunk, pinned: bool) -> None:
        old = self.entries.get(chunk.key)
        if old is not None:
            self.used_bytes -= old.nbytes
        self.entries[chunk.key] = chunk
        self.used_bytes += chunk.nbytes
        self.lru.pop(chunk.key, None)
        if not pinned:
            self.lru[chunk.key] = None
        self._append(_put_record(chunk))

    def remove(self, key: int) -> DiskChunk:
        chunk = self.entries.pop(key)
        self.lru.pop(key, None)
        self.used_bytes -= chunk.nbytes
        self._append(json.dumps({"op": "del", "key": f"{key:016x}"}))
        try:
            os.unlink(self.path_of(key))
        except OSError:
            pass
        return chunk

    def _append(self, line: str) -> None:
        if self._index is None:
            return
        self._index.write(line + "\n")
        self._index.flush()
        self.index_records += 1
        # puts and dels of churning chunks would grow the index forever: once the appended
        # records outnumber the live chunks 3 to 1, rewrite it with the live ones only (amortised
        # O(1) per record; the index stays within 4 records per chunk, plus MIN_COMPACT_RECORDS)
        if self.index_records > max(MIN_COMPACT_RECORDS, 3 * len(self.entries)):
            self._index.close()
            self._index = None
            try:
                self._rewrite_index()
            except OSError as exc:  # (ENOSPC, EIO) the old index is whole: keep appending to it
                log.warning("disk tier %s: compacting the index failed (%s); it keeps growing for now",
                            self.directory, exc)
                with contextlib.suppress(OSError):
                    os.unlink(self.index_path + ".tmp")
                self._index = open(self.index_path, "a", encoding="utf-8")
                self.index_records = 0


MIN_COMPACT_RECORDS = 1024


def _put_record(chunk: DiskChunk) -> str:
    return json.dumps(
        {"op": "put", "key": f"{chunk.key:016x}", "n": chunk.ntokens, "dtype": chunk.dtype,
         "nbytes": chunk.nbytes, "xxh3": chunk.checksum}
    )


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
