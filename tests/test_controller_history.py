"""The dashboard's history: per-second points from the cumulative counters."""

from __future__ import annotations

from lmcache_rs.controller.history import History, quantile
from lmcache_rs.controller.metrics import LATENCY_BUCKETS, Metrics


def test_quantiles_interpolate_within_their_bucket_like_histogram_quantile():
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    assert quantile(0.5, counts) is None
    counts[3] = 10  # all in (50 us, 100 us]
    assert quantile(0.5, counts) == LATENCY_BUCKETS[2] + (LATENCY_BUCKETS[3] - LATENCY_BUCKETS[2]) * 0.5
    assert quantile(0.99, counts) <= LATENCY_BUCKETS[3]
    counts[-1] = 1000  # most beyond the last bound: the last finite bound
    assert quantile(0.99, counts) == LATENCY_BUCKETS[-1]


def test_each_point_is_the_difference_of_two_records():
    m = Metrics()
    h = History(m)
    t0 = h.records[0].at
    m.observe_lookups([0.00007] * 4, hits=3, asked=400, matched=100)
    m.admits += 50
    h.sample(t0 + 1.0)
    h.sample(t0 + 1.5)  # within the interval: not recorded
    m.observe_lookup(0.00007, asked=10, matched=0)
    h.sample(t0 + 2.0)
    h.sample(t0 + 3.0)  # a quiet second
    s = h.series()
    assert s["lookup_rate"] == [4.0, 1.0, 0.0] and s["ingest_rate"] == [50.0, 0.0, 0.0]
    assert s["hit_ratio"] == [0.75, 0.0, None] and s["token_hit_ratio"] == [0.25, 0.0, None]
    assert s["latency_p50_ms"][2] is None and 0.05 < s["latency_p50_ms"][0] <= 0.1
    assert h.last_rates() == (0.0, 0.0)
