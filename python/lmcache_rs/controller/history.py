"""The last minutes of the controller's counters, for the dashboard's charts.

Once a second the housekeeping tick records the cumulative counters; each chart point is the
difference between two records: lookups and ingested keys per second, the latency p50/p99 of
that second's lookups (interpolated within the histogram's buckets, as Prometheus'
``histogram_quantile`` does), the share of its lookups with any match and its matched tokens
over asked tokens. Nothing is computed on the /lookup path; /metrics exports only counters.
"""

from __future__ import annotations

import collections
import time
from typing import Any, NamedTuple

from .metrics import LATENCY_BUCKETS

SECONDS = 300  # how far back the charts go
INTERVAL = 1.0  # seconds between records


class Record(NamedTuple):
    at: float  # time.time()
    lookups: int
    hits: int
    tokens: int
    matched_tokens: int
    ingest_keys: int
    buckets: list[int]


class History:
    def __init__(self, metrics: Any, seconds: float = SECONDS, interval: float = INTERVAL):
        self.metrics = metrics
        self.interval = interval
        self.records: collections.deque[Record] = collections.deque(maxlen=int(seconds / interval) + 1)
        # the counters start at zero: the first interval counts from the start, not from the first tick
        self.records.append(Record(time.time(), 0, 0, 0, 0, 0, [0] * (len(LATENCY_BUCKETS) + 1)))

    def sample(self, now: float | None = None) -> None:
        """Record the counters, at most once per interval (the caller ticks more often)."""
        now = time.time() if now is None else now
        if self.records and now - self.records[-1].at < self.interval * 0.95:
            return
        m = self.metrics.combined()
        self.records.append(Record(now, m.lookups, m.lookup_hits, m.lookup_tokens, m.lookup_matched_tokens,
                                   m.admits + m.evicts, m.buckets()))

    def series(self) -> dict[str, list]:
        """One point per interval: ``t`` (unix seconds), ``lookup_rate``, ``ingest_rate`` (keys/s),
        ``latency_p50_ms``, ``latency_p99_ms``, ``hit_ratio`` (lookups with a match / lookups) and
        ``token_hit_ratio`` (matched tokens / asked tokens); None where no lookup came."""
        out: dict[str, list] = {k: [] for k in ("t", "lookup_rate", "ingest_rate", "latency_p50_ms",
                                                "latency_p99_ms", "hit_ratio", "token_hit_ratio")}
        records = list(self.records)
        for a, b in zip(records, records[1:]):
            dt = b.at - a.at
            if dt <= 0:
                continue
            lookups = b.lookups - a.lookups
            tokens = b.tokens - a.tokens
            counts = [y - x for x, y in zip(a.buckets, b.buckets)]
            out["t"].append(round(b.at, 3))
            out["lookup_rate"].append(round(lookups / dt, 2))
            out["ingest_rate"].append(round((b.ingest_keys - a.ingest_keys) / dt, 2))
            out["latency_p50_ms"].append(_ms(quantile(0.5, counts)))
            out["latency_p99_ms"].append(_ms(quantile(0.99, counts)))
            out["hit_ratio"].append(round((b.hits - a.hits) / lookups, 4) if lookups else None)
            out["token_hit_ratio"].append(round((b.matched_tokens - a.matched_tokens) / tokens, 4) if tokens else None)
        return out

    def last_rates(self) -> tuple[float, float]:
        """(lookups/s, ingest keys/s) over the last interval; 0 before two records."""
        if len(self.records) < 2:
            return 0.0, 0.0
        a, b = self.records[-2], self.records[-1]
        dt = max(b.at - a.at, 1e-9)
        return (b.lookups - a.lookups) / dt, (b.ingest_keys - a.ingest_keys) / dt


def quantile(q: float, counts: list[int]) -> float | None:
    """The q-quantile of lookups counted per latency bucket (the last is +Inf), interpolated
    linearly within its bucket; a quantile in +Inf is the last finite bound. None if empty."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i else 0.0
            return lower + (LATENCY_BUCKETS[i] - lower) * (rank - seen) / n
        seen += n
    return LATENCY_BUCKETS[-1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 4)
