"""GET /metrics: the controller's state in Prometheus' text format, through prometheus_client.

The counters live as plain integers in ``Metrics`` (the /lookup path pays a few adds, never a
lock); this collector reads them only when scraped. Names follow Prometheus' conventions:
counters end in ``_total``, the latency histogram in ``_seconds``, no rate is exported (use
``rate()``). ``process_*`` and ``python_info`` come from prometheus_client's own collectors,
``lmcache_build_info`` names this build. LMCache's controller exports a few gauges named
``lmcache:cache_controller_*`` with ``role="controller"``; the ones with an equivalent here are
exported under those names too, so dashboards built for it keep working (docs/controller.md
lists every metric and the mapping).
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from .. import __version__
from .key_space_check import STATES as KEY_SPACE_STATES
from .metrics import LATENCY_BUCKETS

WORKER_STATES = ("live", "syncing", "need_sync", "disconnected")
LMCACHE_LABELS = {"role": "controller"}  # the label LMCache's controller puts on its metrics


def worker_state(record: Any) -> str:
    return "disconnected" if record.conn is None else record.state


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(family: Metric, label_values: Iterator[tuple[list[str], float]]) -> Metric:
    for labels, value in label_values:
        family.add_metric(labels, value)  # type: ignore[attr-defined]
    return family


class ControllerCollector:
    """Every family the controller exports, built on each scrape from its live state."""

    def __init__(self, controller: Any, stats: Callable[[], dict[str, int]],
                 holder_counts: Callable[[], list[tuple[str, int, str, int]]]):
        self.c = controller
        self.stats = stats  # the index statistics summed over every key space
        self.holder_counts = holder_counts

    def collect(self) -> Iterator[Metric]:
        c = self.c
        m = c.metrics.combined()
        c.registry.flush()
        yield from self._lookups(m)
        yield from self._http(m)
        yield from self._ingest(m)
        yield from self._state()
        if c.key_space_check is not None:
            yield from self._key_space(c.key_space_check)
        if c.lmcache is not None:
            yield _labelled(CounterMetricFamily(
                "lmcache_lmcache_messages", "Messages from LMCache workers, by kind (and dropped ones by reason).",
                labels=["kind"]), (([kind], n) for kind, n in sorted(c.lmcache.counts.items())))
        if c.kv_events is not None:
            yield from self._kv_events(c.kv_events)
        yield from self._lmcache_aliases(m)

    def _lookups(self, m: Any) -> Iterator[Metric]:
        yield _counter("lmcache_lookups", "Lookups answered.", m.lookups)
        yield _counter("lmcache_lookup_errors", "Lookups refused as malformed (400).", m.lookup_errors)
        yield _counter("lmcache_lookup_hits", "Lookups where some instance matched at least one chunk.",
                       m.lookup_hits)
        yield _counter("lmcache_lookup_tokens", "Tokens asked for in lookups.", m.lookup_tokens)
        yield _counter("lmcache_lookup_matched_tokens",
                       "Tokens of each lookup's longest match on any instance, summed.", m.lookup_matched_tokens)
        buckets = []
        cumulative = 0
        counts = m.buckets()
        for bound, n in zip(LATENCY_BUCKETS, counts):
            cumulative += n
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", cumulative + counts[-1]))
        yield HistogramMetricFamily("lmcache_lookup_latency_seconds", "Time to answer a lookup inside the server.",
                                    buckets=buckets, sum_value=m.lookup_seconds)

    def _http(self, m: Any) -> Iterator[Metric]:
        requests = dict(m.http_requests)
        # /lookup is counted apart (a few adds on its fast path): its answers are these two
        requests[("/lookup", 200)] = m.lookups
        requests[("/lookup", 400)] = m.lookup_errors
        yield _labelled(CounterMetricFamily("lmcache_http_requests", "HTTP requests by endpoint and status.",
                                            labels=["endpoint", "status"]),
                        (([e, str(s)], n) for (e, s), n in sorted(requests.items())))
        yield _labelled(CounterMetricFamily("lmcache_rejected_requests",
                                            "HTTP requests refused (bad input, limits), by status.", labels=["status"]),
                        (([str(s)], n) for s, n in sorted(m.rejected_requests.items())))
        yield _counter("lmcache_connections_refused", "HTTP connections refused at the connection limit.",
                       m.connections_refused)
        yield GaugeMetricFamily("lmcache_http_connections", "Open HTTP connections.",
                                value=self.c.http_state.total_connections())

    def _ingest(self, m: Any) -> Iterator[Metric]:
        yield _labelled(CounterMetricFamily("lmcache_rejected_frames", "Worker frames refused, by error code.",
                                            labels=["code"]),
                        (([code], n) for code, n in sorted(m.rejected_frames.items())))
        yield _counter("lmcache_ingest_frames", "Worker event frames applied.", m.ingest_frames)
        yield _labelled(CounterMetricFamily("lmcache_ingest_keys", "Chunk keys received in worker events, by op.",
                                            labels=["op"]), iter([(["admit"], m.admits), (["evict"], m.evicts)]))
        yield _counter("lmcache_ingest_batches", "Index batches applied.", m.ingest_batches)
        yield _counter("lmcache_full_syncs", "Full syncs completed.", m.syncs)
        yield _counter("lmcache_resyncs", "Full syncs requested after a gap.", m.resyncs)
        yield _counter("lmcache_workers_expired", "Workers dropped after the heartbeat timeout.", m.workers_expired)

    def _state(self) -> Iterator[Metric]:
        c = self.c
        stats = self.stats()
        for key, name, doc in (("chunks", "lmcache_index_chunks", "Distinct chunk keys in the index."),
                               ("holdings", "lmcache_index_holdings", "(holder, chunk) pairs in the index."),
                               ("holders", "lmcache_index_holders", "(instance, worker, location) holders."),
                               ("bytes", "lmcache_index_bytes", "Heap bytes used by the index.")):
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
        yield GaugeMetricFamily("lmcache_instances", "Instances with a registered worker.",
                                value=len(c.registry.instances()))
        states = [worker_state(r) for r in c.registry.workers.values()]
        yield _labelled(GaugeMetricFamily("lmcache_workers", "Registered workers, by state.", labels=["state"]),
                        (([st], states.count(st)) for st in WORKER_STATES))
        yield _labelled(GaugeMetricFamily("lmcache_holder_chunks", "Chunks held, by instance, worker and location.",
                                          labels=["instance", "worker", "location"]),
                        (([i, str(w), loc], n) for i, w, loc, n in sorted(self.holder_counts())))
        yield GaugeMetricFamily("lmcache_uptime_seconds", "Seconds since the controller started.",
                                value=time.time() - c.metrics.started)
        info = InfoMetricFamily("lmcache_build", "This build of lmcache_rs.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info

    def _key_space(self, check: Any) -> Iterator[Metric]:
        yield _labelled(GaugeMetricFamily(
            "lmcache_lmcache_key_space",
            "LMCache key-space check: 'mismatch' when lookups of full chunks never match what LMCache workers "
            "hold (settings likely differ from the workers'), 'matched' once one did.", labels=["state"]),
            (([st], int(check.state == st)) for st in KEY_SPACE_STATES))
        yield GaugeMetricFamily("lmcache_lmcache_key_space_unmatched_lookups",
                                "Sampled full-chunk lookups that matched no LMCache instance while none had "
                                "matched yet.", value=check.unmatched)

    def _kv_events(self, kv: Any) -> Iterator[Metric]:
        publishers = kv.describe()
        stale = sum(1 for p in publishers if p["stale"])
        yield _labelled(GaugeMetricFamily("lmcache_kv_event_publishers", "Engines publishing KV events; stale: "
                                          "messages were lost for good and older blocks may be missing.",
                                          labels=["stale"]),
                        iter([(["false"], len(publishers) - stale), (["true"], stale)]))
        yield _labelled(CounterMetricFamily("lmcache_kv_event_batches", "KV-event batches applied, by instance.",
                                            labels=["instance"]),
                        (([p["instance_id"]], p["batches"]) for p in publishers))
        yield _labelled(GaugeMetricFamily("lmcache_kv_event_next_seq", "The sequence number expected next, by "
                                          "instance.", labels=["instance"]),
                        (([p["instance_id"]], p["next_seq"] or 0) for p in publishers))
        for name, what in (("gaps", "Sequence gaps seen"), ("replays", "Replays asked for"),
                           ("restarts", "Publisher restarts seen")):
            yield _labelled(CounterMetricFamily(f"lmcache_kv_event_{name}", f"{what}, by instance.",
                                                labels=["instance"]),
                            (([p["instance_id"]], p[name]) for p in publishers))
        skipped = kv.skipped()
        yield _labelled(CounterMetricFamily("lmcache_kv_events_skipped", "KV events or messages not applied, "
                                            "by reason.", labels=["reason"]),
                        (([reason], n) for reason, n in sorted(skipped.items())))

    def _lmcache_aliases(self, m: Any) -> Iterator[Metric]:
        """LMCache's controller's gauges that have an equivalent here (role="controller")."""
        c = self.c
        states = [worker_state(r) for r in c.registry.workers.values()]
        live = states.count("live")
        syncing = states.count("syncing") + states.count("need_sync")
        lmcache = c.lmcache
        sockets = lmcache.socket_messages if lmcache is not None else {}
        gaps = m.resyncs + (lmcache.counts.get("seq_gaps", 0) if lmcache is not None else 0)
        values = (
            ("kv_pool_keys_count", "The number of keys in the KV pool ((worker, chunk) holdings).",
             self.stats().get("holdings", 0)),
            ("registered_workers_count", "The total number of registered workers.", len(states)),
            ("pull_socket_message_count", "The total number of messages received on the PULL socket.",
             sockets.get("pull", 0)),
            ("reply_socket_message_count", "The total number of messages received on the REPLY socket.",
             sockets.get("reply", 0) + sockets.get("heartbeat", 0)),  # LMCache counts heartbeats there
            ("kv_op_seq_discontinuity_count", "Total count of KV operation sequence number discontinuities.", gaps),
            ("full_sync_workers_syncing", "Number of workers currently in full sync.", syncing),
            ("full_sync_workers_completed", "Number of workers that have completed full sync.", live),
            ("full_sync_global_progress", "Global full sync progress (0.0 to 1.0).",
             live / len(states) if states else 1.0),
        )
        for name, doc, value in values:
            family = GaugeMetricFamily(f"lmcache:cache_controller_{name}", doc, labels=list(LMCACHE_LABELS))
            family.add_metric(list(LMCACHE_LABELS.values()), value)
            yield family


class Exposition:
    """The /metrics page: this controller's families, the process's and Python's."""

    def __init__(self, collector: ControllerCollector):
        # a registry of our own: nothing global, so several controllers in one process (tests) coexist
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
