"""The controller's counters and lookup-latency histogram.

Plain attributes and one bucket array: recording a lookup is a handful of integer adds, cheap
enough for the hot path (the /lookup fast path records a whole read of requests at once).
Nothing here renders them: prometheus.py reads them on a scrape, history.py once a second.
"""

from __future__ import annotations

import bisect
import copy
import time
from typing import Any

# Lookup latency buckets in seconds (upper bounds; +Inf is implicit).
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.lookups = 0
        self.lookup_errors = 0
        self.lookup_seconds = 0.0
        # for the hit ratios: lookups with any match, tokens asked, tokens of the longest match
        self.lookup_hits = 0
        self.lookup_tokens = 0
        self.lookup_matched_tokens = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.http_requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.rejected_requests: dict[int, int] = {}  # status -> count (4xx/5xx answered by the server)
        self.rejected_frames: dict[str, int] = {}  # error code -> count
        self.connections_refused = 0
        self.ingest_frames = 0
        self.admits = 0  # chunk keys in admit ops received
        self.evicts = 0
        self.ingest_batches = 0
        self.syncs = 0
        self.resyncs = 0
        self.workers_expired = 0
        # the HTTP counters of the other HTTP loops (threads), summed when read
        self.peers: list[Metrics] = []

    def combined(self) -> "Metrics":
        """These metrics with the peers' HTTP counters added (a copy; self when there are none)."""
        if not self.peers:
            return self
        m = copy.copy(self)
        m._buckets = list(self._buckets)
        m.rejected_requests = dict(self.rejected_requests)
        m.http_requests = dict(self.http_requests)
        # The peers' loops keep counting meanwhile: list() copies their dicts in one step under
        # the GIL, where iterating them here could meet a key being added.
        for p in self.peers:
            m.lookups += p.lookups
            m.lookup_errors += p.lookup_errors
            m.lookup_seconds += p.lookup_seconds
            m.lookup_hits += p.lookup_hits
            m.lookup_tokens += p.lookup_tokens
            m.lookup_matched_tokens += p.lookup_matched_tokens
            m.connections_refused += p.connections_refused
            for i, n in enumerate(list(p._buckets)):
                m._buckets[i] += n
            for k, n in list(p.rejected_requests.items()):
                m.rejected_requests[k] = m.rejected_requests.get(k, 0) + n
            for k2, n in list(p.http_requests.items()):
                m.http_requests[k2] = m.http_requests.get(k2, 0) + n
        return m

    def total_lookups(self) -> int:
        return self.lookups + sum(p.lookups for p in self.peers)

    def buckets(self) -> list[int]:
        """Lookups per latency bucket (not cumulative; the last is +Inf)."""
        return list(self._buckets)

    def observe_lookup(self, seconds: float, asked: int = 0, matched: int = 0) -> None:
        self.lookups += 1
        self.lookup_seconds += seconds
        self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if matched:
            self.lookup_hits += 1
        self.lookup_tokens += asked
        self.lookup_matched_tokens += matched

    def observe_lookups(self, seconds: list[float], hits: int = 0, asked: int = 0, matched: int = 0) -> None:
        """Several lookups at once (the HTTP fast path): each one's time, and their sums of
        lookups with a match, tokens asked and tokens matched."""
        self.lookups += len(seconds)
        self.lookup_seconds += sum(seconds)
        buckets = self._buckets
        for s in seconds:
            buckets[bisect.bisect_left(LATENCY_BUCKETS, s)] += 1
        self.lookup_hits += hits
        self.lookup_tokens += asked
        self.lookup_matched_tokens += matched

    def count_request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def count_rejected(self, status: int) -> None:
        self.rejected_requests[status] = self.rejected_requests.get(status, 0) + 1

    def count_rejected_frame(self, code: str) -> None:
        self.rejected_frames[code] = self.rejected_frames.get(code, 0) + 1


def settle_writes(index: Any, metrics: Metrics) -> Exception | None:
    """Wait until the writes ``index`` applies behind its caller (``Index.apply_batch_later``)
    are applied, and count them in ``metrics``; the error instead if its write thread failed."""
    try:
        admitted, evicted = index.settle()
    except Exception as exc:
        return exc
    metrics.admits += admitted
    metrics.evicts += evicted
    return None
