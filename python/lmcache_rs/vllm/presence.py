"""Which chunks a rank's store may hold, read by the scheduler without asking the rank.

Asking a rank over the rank channel costs a round trip between processes on every new
request, most of the connector's cost on a miss. Each rank therefore keeps a counting filter
in shared memory: ``SLOTS`` counters, ``counter[key % SLOTS]`` the number of held (chunk,
location) copies whose key falls there. The scheduler reads the counter of a prompt's first
chunk key: zero on any rank means that rank holds no prefix of the prompt, a miss known
without a round trip; otherwise it asks as before (a shared counter only costs that round
trip). Saves are stored within the step that computed them, so a prompt saved by one
request is in the table before the next request is looked up.

Only the rank writes its table, from its store's watcher (under the store's lock); the
scheduler reads aligned 32-bit counters. A counter read while it changes is the old or the
new value; either is an answer the store could have given a moment earlier or later.

A table is shared memory until unlinked, and vLLM does not always shut connectors down. So a
rank holds a shared lock on its table for as long as it lives (the kernel drops it when the
process dies, however it dies), and a rank creating its table removes the tables nobody
holds any more.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from typing import Optional

from lmcache_rs import chunk_hashes

from .leftovers import hold, remove_unheld

SLOTS = 1 << 20  # 4 MiB of counters per rank: a store of 10,000 chunks shares a counter 1 % of the time
# How long the scheduler waits before looking again for a rank's table that was not there.
RETRY_SECONDS = 1.0


def table_path(engine_id: str, data_parallel_rank: int, rank: int) -> str:
    """The file of one rank's table (shared memory where the system has it)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in engine_id)[:40]
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(directory, f"lmcache_rs-{os.getuid()}-{safe}-dp{data_parallel_rank}-r{rank}.keys")


def remove_orphans(directory: str) -> None:
    """Unlink this user's tables whose rank is gone: nobody holds their lock (leftovers.py;
    a table is its own lock file)."""
    remove_unheld(os.path.join(directory, f"lmcache_rs-{os.getuid()}-*.keys"))


class PresenceTable:
    """A rank's table, written by the rank: ``change`` is its store's watcher (see
    ``KVStore.watch``). Built under another name and ``publish``-ed once filled, so that a
    reader never sees it half filled."""

    def __init__(self, path: str):
        self.path = path
        remove_orphans(os.path.dirname(path) or ".")
        self._partial: Optional[str] = f"{path}.{os.getpid()}.tmp"
        self._file = hold(self._partial, "w+b")  # while this rank lives (the rename keeps the lock)
        self._file.truncate(SLOTS * 4)
        self._map = mmap.mmap(self._file.fileno(), SLOTS * 4)
        self._counts = memoryview(self._map).cast("I")

    def publish(self) -> None:
        if self._partial is not None:
            os.replace(self._partial, self.path)
            self._partial = None

    def _add(self, key: int, delta: int) -> None:
        slot = key % SLOTS
        self._counts[slot] = max(0, self._counts[slot] + delta)  # never wraps to a huge count

    def change(self, op: str, location: str, keys: list[int]) -> None:
        """The store admitted (``op`` "admit") or evicted copies of ``keys`` at ``location``."""
        delta = 1 if op == "admit" else -1
        for key in keys:
            self._add(key, delta)

    def close(self) -> None:
        try:
            os.unlink(self._partial or self.path)
        except OSError:
            pass
        self._counts.release()
        self._map.close()
        self._file.close()


class PresenceReader:
    """The scheduler's view of every rank's table."""

    def __init__(self, paths: list[str], chunk_size: int, hash_seed: int):
        self.paths = paths
        self.chunk_size, self.hash_seed = chunk_size, hash_seed
        self._counts: list[Optional[memoryview]] = [None] * len(paths)
        self._next_try = 0.0

    def _tables(self) -> Optional[list[memoryview]]:
        """Every rank's counters, or None while a table is missing (not started, or off)."""
        if all(c is not None for c in self._counts):
            return self._counts  # type: ignore[return-value]
        now = time.monotonic()
        if now < self._next_try:
            return None
        self._next_try = now + RETRY_SECONDS
        for rank, path in enumerate(self.paths):
            if self._counts[rank] is None:
                try:
                    with open(path, "rb") as f:
                        self._counts[rank] = memoryview(mmap.mmap(f.fileno(), SLOTS * 4, access=mmap.ACCESS_READ)).cast("I")
                except (OSError, ValueError):
                    return None
        return self._counts  # type: ignore[return-value]

    def surely_missing(self, tokens: list[int]) -> bool:
        """Whether some rank's store holds no prefix of ``tokens`` (then the hit is 0 and
        nobody needs asking); False when unsure."""
        tables = self._tables()
        if tables is None or not tokens:
            return False
        slot = first_key(tokens, self.chunk_size, self.hash_seed) % SLOTS
        return any(counts[slot] == 0 for counts in tables)


def first_key(tokens: list[int], chunk_size: int, hash_seed: int) -> int:
    """The store's key of the first chunk of ``tokens``."""
    return chunk_hashes(tokens[:chunk_size], chunk_size, hash_seed)[0]
