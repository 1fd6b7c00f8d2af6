"""LMCache's read-only controller endpoints: GET /controller/key-stats and /controller/workers.

LMCache 0.5.6's API server answers these from its worker registry; its web page and operators'
scripts read them. Ours answers the same shapes for every registered worker (ours, LMCache's
and engine event publishers'), with key counts from the index copy that /lookup reads, so a
write still queued behind the event loop is counted once it is applied, never before.

A worker's key count is what LMCache counts: its (chunk, location) holdings, summed over
locations. Instances come sorted by id and workers by id (LMCache lists them in registration
order). docs/lmcache-compat.md lists the differences.
"""

from __future__ import annotations

import re
from typing import Any, Iterable
from urllib.parse import parse_qs

_INTEGER = re.compile(r"[+-]?[0-9]{1,18}")


class NotFound(Exception):
    """No registered worker matches the query (LMCache answers 404 too)."""


class BadQuery(Exception):
    """A query parameter that cannot be read (LMCache answers 422, ours 400)."""


def key_counts(rows: Iterable[tuple[str, int, str, int]]) -> dict[tuple[str, int], int]:
    """(instance, worker) -> holdings over every location, from ``Index.holder_counts`` rows."""
    out: dict[tuple[str, int], int] = {}
    for instance_id, worker_id, _location, n in rows:
        key = (instance_id, worker_id)
        out[key] = out.get(key, 0) + n
    return out


def key_stats(instances: dict[str, list[Any]], counts: dict[tuple[str, int], int]) -> dict:
    """The body of GET /controller/key-stats."""
    listed = [{"instance_id": instance_id,
               "key_count": sum(counts.get(r.key, 0) for r in records),
               "worker_count": len(records)}
              for instance_id, records in instances.items()]
    return {"total_key_count": sum(i["key_count"] for i in listed),
            "total_instance_count": len(listed),
            "total_worker_count": sum(i["worker_count"] for i in listed),
            "instances": listed}


def worker_info(record: Any, count: int, peer_init_url: str | None) -> dict:
    return {"instance_id": record.instance_id, "worker_id": record.worker_id, "ip": record.host,
            "port": record.worker_port, "peer_init_url": peer_init_url,
            "registration_time": record.registered_at, "last_heartbeat_time": record.last_seen_wall,
            "key_count": count}


def parse_worker_query(query: bytes) -> tuple[str | None, int | None]:
    """(instance_id, worker_id) from ``?instance_id=...&worker_id=...``; either may be absent.
    An empty ``instance_id`` names no instance (404 later); ``worker_id`` must be an integer
    in ASCII digits."""
    try:
        params = parse_qs(query.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise BadQuery("the query string is not UTF-8") from None
    instance_id = params["instance_id"][-1] if "instance_id" in params else None
    worker_id = None
    if "worker_id" in params:
        text = params["worker_id"][-1]
        if not _INTEGER.fullmatch(text):
            raise BadQuery(f"worker_id must be an integer, got {text[:100]!r}")
        worker_id = int(text)
    return instance_id, worker_id


def workers(instances: dict[str, list[Any]], counts: dict[tuple[str, int], int], peer_url: Any,
            instance_id: str | None, worker_id: int | None) -> dict:
    """The body of GET /controller/workers: one worker when both ids are given, else a list
    (every worker, an instance's, or every instance's workers with that id)."""
    if instance_id is not None and instance_id not in instances:
        if worker_id is not None:
            raise NotFound(f"Worker ({instance_id}, {worker_id}) not found")
        raise NotFound(f"No workers found for instance {instance_id}")
    records = instances[instance_id] if instance_id is not None else [
        r for each in instances.values() for r in each]
    if worker_id is not None:
        records = [r for r in records if r.worker_id == worker_id]
    listed = [worker_info(r, counts.get(r.key, 0), peer_url(r)) for r in records]
    if instance_id is not None and worker_id is not None:
        if not listed:
            raise NotFound(f"Worker ({instance_id}, {worker_id}) not found")
        return listed[0]
    return {"workers": listed, "total_count": len(listed)}
