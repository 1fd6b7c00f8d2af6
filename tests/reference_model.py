"""A plain-Python model of the lookup contract (docs/design.md), used as the test oracle.

It is deliberately naive: sets and loops, no cleverness, so that it is obviously right.
Every fast path in the project (the Rust index, the controller over HTTP) is checked
against it on random workloads.
"""

from __future__ import annotations

import struct

import xxhash

# Faster tiers win ties between locations with equal matched length.
TIER_RANK = {"GPU": 0, "LocalCPUBackend": 1, "LocalDiskBackend": 2}
REMOTE_RANK = 3


def tier_key(location: str) -> tuple[int, str]:
    return (TIER_RANK.get(location, REMOTE_RANK), location)


def chunk_hashes(tokens, chunk_size: int = 256, seed: int = 0) -> list[int]:
    """Chained seeded xxh3-64 over little-endian u32 tokens; the last partial chunk counts."""
    out: list[int] = []
    prev: int | None = None
    for start in range(0, len(tokens), chunk_size):
        chunk = struct.pack(f"<{len(tokens[start:start + chunk_size])}I", *tokens[start:start + chunk_size])
        data = chunk if prev is None else struct.pack("<Q", prev) + chunk
        prev = xxhash.xxh3_64_intdigest(data, seed=seed)
        out.append(prev)
    return out


def chunk_lengths(num_tokens: int, chunk_size: int) -> list[int]:
    return [min(chunk_size, num_tokens - s) for s in range(0, num_tokens, chunk_size)]


class ReferenceIndex:
    def __init__(self, chunk_size: int = 256, seed: int = 0):
        self.chunk_size = chunk_size
        self.seed = seed
        self.workers: dict[str, set[int]] = {}
        self.holdings: dict[int, set[tuple[str, int, str]]] = {}

    # -- membership -------------------------------------------------------
    def register_worker(self, instance_id: str, worker_id: int) -> None:
        self.workers.setdefault(instance_id, set()).add(worker_id)

    def remove_worker(self, instance_id: str, worker_id: int) -> int:
        removed = self._drop(lambda h: h[0] == instance_id and h[1] == worker_id)
        live = self.workers.get(instance_id)
        if live is not None:
            live.discard(worker_id)
            if not live:
                del self.workers[instance_id]
        return removed

    def clear(self, instance_id: str, location: str | None = None) -> int:
        return self._drop(lambda h: h[0] == instance_id and (location is None or h[2] == location))

    def _drop(self, pred) -> int:
        removed = 0
        for key in list(self.holdings):
            keep = {h for h in self.holdings[key] if not pred(h)}
            removed += len(self.holdings[key]) - len(keep)
            if keep:
                self.holdings[key] = keep
            else:
                del self.holdings[key]
        return removed

    # -- events -----------------------------------------------------------
    def admit(self, instance_id: str, worker_id: int, location: str, hashes) -> int:
        # An admit from an unknown worker registers it (a worker reports before it is seen otherwise).
        self.register_worker(instance_id, worker_id)
        holder = (instance_id, worker_id, location)
        added = 0
        for h in hashes:
            held = self.holdings.setdefault(h, set())
            if holder not in held:
                held.add(holder)
                added += 1
        return added

    def evict(self, instance_id: str, worker_id: int, location: str, hashes) -> int:
        holder = (instance_id, worker_id, location)
        removed = 0
        for h in hashes:
            held = self.holdings.get(h)
            if held and holder in held:
                held.discard(holder)
                removed += 1
                if not held:
                    del self.holdings[h]
        return removed

    # -- queries ----------------------------------------------------------
    def lookup(self, tokens) -> dict[str, tuple[str, int]]:
        hashes = chunk_hashes(tokens, self.chunk_size, self.seed)
        lengths = chunk_lengths(len(tokens), self.chunk_size)
        answer: dict[str, tuple[str, int]] = {}
        for instance_id, live in self.workers.items():
            locations = {h[2] for held in self.holdings.values() for h in held if h[0] == instance_id}
            best: tuple[str, int] | None = None
            for location in sorted(locations, key=tier_key):
                matched = 0
                for h, n in zip(hashes, lengths):
                    held = self.holdings.get(h, set())
                    if all((instance_id, w, location) in held for w in live):
                        matched += n
                    else:
                        break
                if matched > 0 and (best is None or matched > best[1]):
                    best = (location, matched)
            if best is not None:
                answer[instance_id] = best
        return answer
