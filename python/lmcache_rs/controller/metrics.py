"""Counters and a latency histogram, rendered in the Prometheus text format (version 0.0.4).

Plain attributes and one bucket array: recording a lookup is a handful of integer adds,
cheap enough for the hot path.
"""

from __future__ import annotations

import bisect
import copy
import time

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
        # recent rates, sampled by the controller's housekeeping tick
        self._rate_mark = (time.monotonic(), 0, 0)
        self.lookup_rate = 0.0
        self.ingest_rate = 0.0
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

    def observe_lookup(self, seconds: float) -> None:
        self.lookups += 1
        self.lookup_seconds += seconds
        self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def observe_lookups(self, seconds: list[float]) -> None:
        """Several lookups at once (the HTTP fast path), each with its own time."""
        self.lookups += len(seconds)
        self.lookup_seconds += sum(seconds)
        buckets = self._buckets
        for s in seconds:
            buckets[bisect.bisect_left(LATENCY_BUCKETS, s)] += 1

    def count_request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def count_rejected(self, status: int) -> None:
        self.rejected_requests[status] = self.rejected_requests.get(status, 0) + 1

    def count_rejected_frame(self, code: str) -> None:
        self.rejected_frames[code] = self.rejected_frames.get(code, 0) + 1

    def tick(self) -> None:
        """Update the per-second rates (called about once a second)."""
        now = time.monotonic()
        then, lookups, keys = self._rate_mark
        dt = now - then
        if dt >= 0.5:
            total = self.total_lookups()
            self.lookup_rate = (total - lookups) / dt
            self.ingest_rate = (self.admits + self.evicts - keys) / dt
            self._rate_mark = (now, total, self.admits + self.evicts)

    def render(self, gauges: dict[str, tuple[str, list[tuple[dict[str, str], float]]]]) -> bytes:
        """Prometheus text: the counters here (with the peers') plus ``gauges`` (name -> (help, samples))."""
        if self.peers:
            return self.combined().render_own(gauges)
        return self.render_own(gauges)

    def render_own(self, gauges: dict[str, tuple[str, list[tuple[dict[str, str], float]]]]) -> bytes:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, dict[str, str], float]]):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for suffix, labels, value in samples:
                out.append(f"{name}{suffix}{_labels(labels)} {_num(value)}")

        family("lmcache_lookups_total", "counter", "Lookups answered.", [("", {}, self.lookups)])
        family("lmcache_lookup_errors_total", "counter", "Lookups refused as malformed.", [("", {}, self.lookup_errors)])
        cumulative = 0
        samples: list[tuple[str, dict[str, str], float]] = []
        for bound, count in zip(LATENCY_BUCKETS, self._buckets):
            cumulative += count
            samples.append(("_bucket", {"le": _num(bound)}, cumulative))
        cumulative += self._buckets[-1]
        samples.append(("_bucket", {"le": "+Inf"}, cumulative))
        samples.append(("_sum", {}, self.lookup_seconds))
        samples.append(("_count", {}, cumulative))
        family("lmcache_lookup_latency_seconds", "histogram", "Time to answer a lookup inside the server.", samples)
        family(
            "lmcache_http_requests_total", "counter", "HTTP requests by endpoint and status.",
            [("", {"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(self.http_requests.items())],
        )
        family(
            "lmcache_rejected_requests_total", "counter", "HTTP requests refused (bad input, limits).",
            [("", {"status": str(s)}, n) for s, n in sorted(self.rejected_requests.items())],
        )
        family("lmcache_connections_refused_total", "counter", "HTTP connections refused at the connection limit.",
               [("", {}, self.connections_refused)])
        family(
            "lmcache_rejected_frames_total", "counter", "Worker frames refused, by error code.",
            [("", {"code": c}, n) for c, n in sorted(self.rejected_frames.items())],
        )
        family("lmcache_ingest_frames_total", "counter", "Worker event frames applied.", [("", {}, self.ingest_frames)])
        family("lmcache_ingest_keys_total", "counter", "Chunk keys received in worker events, by op.",
               [("", {"op": "admit"}, self.admits), ("", {"op": "evict"}, self.evicts)])
        family("lmcache_ingest_batches_total", "counter", "Index batches applied.", [("", {}, self.ingest_batches)])
        family("lmcache_ingest_keys_per_second", "gauge", "Recent ingest rate.", [("", {}, self.ingest_rate)])
        family("lmcache_lookups_per_second", "gauge", "Recent lookup rate.", [("", {}, self.lookup_rate)])
        family("lmcache_full_syncs_total", "counter", "Full syncs completed.", [("", {}, self.syncs)])
        family("lmcache_resyncs_total", "counter", "Full syncs requested after a gap.", [("", {}, self.resyncs)])
        family("lmcache_workers_expired_total", "counter", "Workers dropped after the heartbeat timeout.",
               [("", {}, self.workers_expired)])
        for name, (help_text, gauge_samples) in gauges.items():
            family(name, "gauge", help_text, [("", labels, value) for labels, value in gauge_samples])
        out.append("")
        return "\n".join(out).encode()


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
