"""HTTP endpoints: /lookup on the hot path, LMCache's management endpoints, metrics, dashboard.

Request and response shapes follow LMCache's controller API server (see docs/controller.md).
Every handler validates its JSON body first and answers 400 ``{"error": ...}`` naming the
problem; nothing raised here reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, Callable
from urllib.parse import parse_qs

from .. import lookup_body_names
from ..wire import pack_u32s
from .dashboard import DASHBOARD_HTML
from .http import HTML, JSON, PROMETHEUS, Request, Response, error_body
from .operations import OperationError, Operations
from .prometheus import ControllerCollector, Exposition, worker_state
from .registry import Registry
from . import worker_listing
from ..log_limit import RateLimitedLog

log = logging.getLogger("lmcache_rs.controller.api")
# who changed what, for the operator: each mutating request, and each refused key (a client
# can send those as fast as it likes, so their lines are capped)
audit_refusal = RateLimitedLog(log, logging.INFO)

_U32 = 2**32
# Endpoints that change what workers hold (or the index); with an API key set they need it.
MUTATING = frozenset({"/clear", "/pin", "/unpin", "/move", "/compress", "/decompress"})


class BadRequest(Exception):
    pass


def _ok(payload: dict) -> Response:
    return (200, JSON, json.dumps(payload).encode())


def _error(status: int, message: str) -> Response:
    return (status, JSON, error_body(message))


def _parse(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(data).__name__}")
    return data


def _field(data: dict, name: str, kind: type | tuple, what: str, optional: bool = False, default: Any = None) -> Any:
    if name not in data or data[name] is None:
        if optional:
            return default
        raise BadRequest(f"missing field {name!r} ({what})")
    value = data[name]
    if kind is int and (type(value) is not int):
        raise BadRequest(f"field {name!r} must be {what}, got {type(value).__name__}")
    if kind is bool and type(value) is not bool:
        raise BadRequest(f"field {name!r} must be {what}, got {type(value).__name__}")
    if not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be {what}, got {type(value).__name__}")
    if isinstance(value, str) and not value:
        raise BadRequest(f"field {name!r} must not be empty")
    return value


def _tokens(data: dict, optional: bool = False) -> list[int]:
    tokens = _field(data, "tokens", list, "a list of token ids", optional=optional, default=[])
    for i, t in enumerate(tokens):
        if type(t) is not int or not 0 <= t < _U32:
            raise BadRequest(f"tokens[{i}] must be an integer in [0, 2^32), got {t!r:.40}")
    return tokens


def _position(data: dict, name: str) -> tuple[str, str]:
    value = _field(data, name, list, "[instance_id, location]")
    if len(value) != 2 or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"field {name!r} must be [instance_id, location] (two non-empty strings)")
    return value[0], value[1]


# A /lookup body naming one of these picks engine-event namespaces (model, LoRA, salt).
NAMESPACE_FIELDS = ("model", "lora_name", "cache_salt")


class Lookup:
    """POST /lookup: the body goes to ``Index.lookup_json`` as bytes; one per HTTP loop.

    Each key space has its own index: our workers' xxh3 chain, LMCache workers' CPython hash
    chain, and one per engine-event namespace (model, LoRA, salt, block size). An instance
    belongs to one of them. A request is answered by the indexes that have holders: one alone
    answers directly, on the fast path too; several answer each for its own instances and the
    answers are merged. A body naming ``model``, ``lora_name`` or ``cache_salt`` asks only the
    engine-event namespaces that match; without them every base namespace (no LoRA, no salt)
    of every model takes part."""

    def __init__(self, index: Any, metrics: Any, event_prefix: str, registry: Any = None, lmcache: Any = None,
                 kv_events: Any = None):
        self.index = index
        self.metrics = metrics
        self.prefix = event_prefix
        self.counter = 0
        self.registry = registry  # counts workers per source: which index to ask
        self.lmcache = lmcache  # the LMCache source (its .index), if served
        self.kv_events = kv_events  # the engine-event source (its namespaces), if served
        # key_space_check.py asks for a request body now and then: the next /lookup then takes
        # the general path, which keeps its body. The fast path pays one attribute test.
        self._sample_wanted = False
        self._sample: bytes | None = None
        # a replica: the log position its answers reflect, sent as X-Lmc-Seq
        self.applied_seq: Callable[[], int] | None = None

    def want_sample(self) -> None:
        self._sample_wanted = True

    def take_sample(self) -> bytes | None:
        """The body kept since want_sample() (None if no /lookup came); stops asking."""
        self._sample_wanted = False
        body, self._sample = self._sample, None
        return body

    def _indexes(self) -> list[Any]:
        """The indexes a request without namespace fields asks."""
        if self.lmcache is None and self.kv_events is None:
            return [self.index]
        counts = self.registry.by_source
        out = [self.index] if counts.get(None) else []
        if self.lmcache is not None and counts.get(self.lmcache):
            out.append(self.lmcache.index)
        if self.kv_events is not None:
            out.extend(ns.index for ns in self.kv_events.lookup_namespaces(None, None, None))
        return out or [self.index]

    def __call__(self, request: Request) -> Response:
        start = time.perf_counter()
        self.counter += 1
        detail = False
        if request.query:
            detail = _truthy(request.query, b"detail")
        event_id = self.prefix + str(self.counter)
        if self._sample_wanted:
            self._sample_wanted = False
            self._sample = request.body
        seq = self.applied_seq() if self.applied_seq is not None else 0  # read before the index
        try:
            if self.kv_events is not None and lookup_body_names(request.body, NAMESPACE_FIELDS):
                indexes = self._named_indexes(request.body)
            else:
                indexes = self._indexes()
            if len(indexes) == 1 and not (detail and self.kv_events is not None and self.kv_events.any_stale):
                body, asked, matched = indexes[0].lookup_json_counted(request.body, event_id, detail)
            else:
                body, asked, matched = self._merged(indexes, request.body, event_id, detail)
        except BadRequest as exc:
            self.metrics.lookup_errors += 1
            self.metrics.count_rejected(400)
            return (400, JSON, error_body(str(exc)))
        except (ValueError, TypeError) as exc:  # the index's InvalidArgument/InvalidType errors
            self.metrics.lookup_errors += 1
            self.metrics.count_rejected(400)
            return (400, JSON, error_body(str(exc)))
        self.metrics.observe_lookup(time.perf_counter() - start, asked, matched)
        if self.applied_seq is not None:
            return (200, JSON, body, b"X-Lmc-Seq: %d\r\n" % seq)
        return (200, JSON, body)

    def _named_indexes(self, body: bytes) -> list[Any]:
        data = _parse(body)
        names = []
        for field in NAMESPACE_FIELDS:
            value = data.get(field)
            if value is not None and (type(value) is not str or not value):
                raise BadRequest(f"field {field!r} must be a non-empty string or null")
            names.append(value)
        _tokens(data)  # checked here too: no namespace may answer, and a bad body is still a 400
        if all(name is None for name in names):  # {"model": "m", "model": null}: the last value wins
            return self._indexes()
        return [ns.index for ns in self.kv_events.lookup_namespaces(*names)]

    def _merged(self, indexes: list[Any], body: bytes, event_id: str, detail: bool) -> tuple[bytes, int, int]:
        """Each index answers for its instances; an instance in several keeps its longest match.
        Returns (response body, tokens asked, tokens of the longest match)."""
        out: dict[str, Any] = {"event_id": event_id, "layout_info": {}}
        layout = out["layout_info"]
        details: dict[str, Any] = {}
        asked = matched = 0
        for index in indexes:
            answer, asked, theirs_matched = index.lookup_json_counted(body, event_id, detail)
            matched = max(matched, theirs_matched)
            theirs = json.loads(answer)
            for instance_id, answer in theirs["layout_info"].items():
                if instance_id not in layout or answer[1] > layout[instance_id][1]:
                    layout[instance_id] = answer
                    if detail:
                        details[instance_id] = theirs["detail"].get(instance_id)
        out.update(layout)
        if detail:
            out["detail"] = details
            stale = self.kv_events.stale_instances() if self.kv_events is not None else None
            if stale:
                out["stale"] = stale  # engines that lost messages for good: older blocks may be missing
        return json.dumps(out, separators=(",", ":")).encode(), asked, matched

    def answer(self, data: bytes, max_header_bytes: int, max_body_bytes: int) -> tuple[bytes, int, bool]:
        """The HTTP fast path: answer the complete plain ``POST /lookup`` requests at the start
        of ``data`` in one call to the index (GIL released; see rust/http_fast.rs). Returns
        (responses, bytes consumed, close after writing); the caller hands the rest of ``data``
        to the general HTTP parser, which answers it exactly as it would have."""
        if self._sample_wanted:
            return b"", 0, False
        kv = self.kv_events
        if kv is not None and kv.any_stale and b"detail=1" in data:
            return b"", 0, False  # the general path lists stale engines
        indexes = self._indexes()
        if len(indexes) != 1:
            return b"", 0, False
        # a body naming a namespace is left to the general path, which picks the namespaces
        leave = NAMESPACE_FIELDS if kv is not None else ()
        extra = b"X-Lmc-Seq: %d\r\n" % self.applied_seq() if self.applied_seq is not None else b""
        out, consumed, seconds, close, hits, asked, matched = indexes[0].answer_lookups(
            data, self.prefix, self.counter + 1, max_header_bytes, max_body_bytes, extra, leave)
        if seconds:
            self.counter += len(seconds)
            self.metrics.observe_lookups(seconds, hits, asked, matched)
        return out, consumed, close


class ForwardingApp:
    """The app of an extra HTTP loop: /lookup is answered on that loop (the index releases
    the GIL while it works); every other request runs on the main loop, which owns the
    registry and the worker connections."""

    def __init__(self, lookup: Lookup, main_app: Callable[[Request], Any], main_loop: asyncio.AbstractEventLoop):
        self.lookup = lookup
        self.main_app = main_app
        self.main_loop = main_loop

    def __call__(self, request: Request) -> Any:
        if request.path == b"/lookup" and request.method == b"POST":
            return self.lookup(request)
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_on_main(self.main_app, request), self.main_loop))


async def _on_main(app: Callable[[Request], Any], request: Request) -> Response:
    result = app(request)
    if type(result) is not tuple:
        result = await result
    return result


class Api:
    """Routes requests to handlers; ``__call__`` is the HTTP server's app."""

    def __init__(self, controller: Any):
        self.c = controller
        self.index = controller.index
        self.metrics = controller.metrics
        self.registry: Registry = controller.registry
        self.ops: Operations = controller.ops
        self.event_ids = controller.event_ids
        self.chunk_size = controller.settings.chunk_size
        self.lookup = Lookup(self.index, self.metrics, f"Lookup-{self.event_ids.tag}-", self.registry,
                             controller.lmcache, controller.kv_events)
        posts: dict[str, Callable[[Request], Any]] = {
            "/clear": self.clear,
            "/pin": self.pin,
            "/unpin": self.unpin,
            "/move": self.move,
            "/compress": self.compress,
            "/decompress": self.decompress,
            "/health": self.health,
            "/check_finish": self.check_finish,
            "/query_worker_info": self.query_worker_info,
            "/query_instance": self.query_instance,
        }
        gets: dict[str, Callable[[Request], Any]] = {
            "/metrics": self.metrics_page,
            "/healthz": self.healthz,
            "/": self.dashboard,
            "/dashboard.json": self.dashboard_json,
            "/controller/key-stats": self.key_stats,
            "/controller/workers": self.workers,
        }
        self.exposition = Exposition(ControllerCollector(controller, self._stats, self._holder_counts))
        key = controller.settings.api_key
        self.api_key: bytes | None = key.encode() if key else None
        self.routes: dict[bytes, dict[bytes, Callable[[Request], Any]]] = {}
        if controller.settings.role == "replica":  # the workers are the ingest's
            posts = {path: self._forwarded for path in posts}
        for path, handler in posts.items():
            guarded = self._guard(path, handler)
            if self.api_key is not None and path in MUTATING:
                guarded = self._require_key(path, guarded)
            self.routes.setdefault(path.encode(), {})[b"POST"] = guarded
        for path, handler in gets.items():
            guarded = self._guard(path, handler)
            # HEAD: the same answer, whose body the HTTP layer leaves out
            self.routes.setdefault(path.encode(), {}).update({b"GET": guarded, b"HEAD": guarded})
        self.routes[b"/lookup"] = {b"POST": self.lookup}

    def __call__(self, request: Request) -> Any:
        # /lookup needs no key. The HTTP fast path (Lookup.answer, set as the server's
        # fast_lookup) answers plain POST /lookup requests without coming here: a check added
        # for /lookup here must be added there too.
        if request.path == b"/lookup" and request.method == b"POST":
            return self.lookup(request)
        methods = self.routes.get(request.path)
        if methods is None:
            self.metrics.count_rejected(404)
            return _error(404, f"no such endpoint: {request.path.decode('latin-1')!s:.200}")
        handler = methods.get(request.method)
        if handler is None:
            self.metrics.count_rejected(405)
            allowed = ", ".join(sorted(m.decode() for m in methods))
            return (405, JSON, error_body(f"method {request.method.decode('latin-1')} not allowed; use {allowed}"),
                    b"Allow: " + allowed.encode() + b"\r\n")
        return handler(request)

    # -- management endpoints --------------------------------------------------------------
    def _forwarded(self, request: Request) -> Any:
        return self.c.replication.forward(request)

    def _require_key(self, path: str, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """With --api-key set: the endpoint answers 401 unless the request carries the key."""
        key = self.api_key
        assert key is not None
        metrics = self.metrics

        def keyed(request: Request) -> Any:
            credential = request.credential
            if credential is None or not hmac.compare_digest(credential, key):
                metrics.count_rejected(401)
                metrics.count_request(path, 401)
                what = "wrong" if credential is not None else "no"
                audit_refusal("%s from %s refused (401): %s API key sent", path, request.peer, what)
                return (401, JSON, error_body(f"{path} changes state and needs the API key; {what} key sent "
                                              "(send 'Authorization: Bearer <key>' or 'X-API-Key: <key>')"),
                        b'WWW-Authenticate: Bearer realm="lmcache"\r\n')
            return handler(request)

        return keyed

    def _guard(self, path: str, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """Turn BadRequest/OperationError into answers, sync or async."""
        metrics = self.metrics
        audited = path in MUTATING

        def guarded(request: Request) -> Any:
            try:
                result = handler(request)
            except BadRequest as exc:
                metrics.count_rejected(400)
                metrics.count_request(path, 400)
                result = _error(400, str(exc))
            except OperationError as exc:
                metrics.count_request(path, exc.status)
                result = _error(exc.status, str(exc))
            else:
                if not isinstance(result, tuple):
                    return self._finish_async(path, request, result)
                metrics.count_request(path, result[0])
            if audited:
                _audit(path, request, result)
            return result

        return guarded

    async def _finish_async(self, path: str, request: Request, coro) -> Response:
        try:
            result = await coro
        except BadRequest as exc:
            self.metrics.count_rejected(400)
            result = _error(400, str(exc))
        except OperationError as exc:
            result = _error(exc.status, str(exc))
        self.metrics.count_request(path, result[0])
        if path in MUTATING:
            _audit(path, request, result)
        return result

    def clear(self, request: Request):
        data = _parse(request.body)
        instance_id = _field(data, "instance_id", str, "a string")
        location = _field(data, "location", str, "a location name", optional=True)
        if location in ("all", "*"):
            location = None
        event_id = self.event_ids.new("Clear")

        async def run() -> Response:
            num_tokens = await self.ops.clear(instance_id, location)
            self.ops.events.finish(event_id)
            return _ok({"event_id": event_id, "num_tokens": num_tokens})

        return run()

    def _token_op(self, request: Request, op: str, kind: str, needs_method: bool):
        data = _parse(request.body)
        instance_id = _field(data, "instance_id", str, "a string")
        location = _field(data, "location", str, "a location name", optional=not needs_method)
        tokens = _tokens(data, optional=needs_method)
        args: dict[str, Any] = {"tokens": pack_u32s(tokens), "location": location}
        if needs_method:
            args["method"] = _field(data, "method", str, "a compression method name")
        event_id = self.event_ids.new(kind)

        async def run() -> Response:
            num_tokens = await self.ops.per_token_op(instance_id, op, args, len(tokens))
            self.ops.events.finish(event_id)
            return _ok({"event_id": event_id, "num_tokens": num_tokens})

        return run()

    def pin(self, request: Request):
        return self._token_op(request, "pin", "Pin", needs_method=False)

    def unpin(self, request: Request):
        return self._token_op(request, "unpin", "Unpin", needs_method=False)

    def compress(self, request: Request):
        return self._token_op(request, "compress", "Compress", needs_method=True)

    def decompress(self, request: Request):
        return self._token_op(request, "decompress", "Decompress", needs_method=True)

    def move(self, request: Request) -> Response:
        data = _parse(request.body)
        source = _position(data, "old_position")
        target = _position(data, "new_position")
        tokens = _tokens(data, optional=True)
        copy = data.get("copy", data.get("should_copy", False))
        if copy is None:
            copy = False
        if type(copy) is not bool:
            raise BadRequest("field 'copy' must be a boolean")
        # tokens of the prefix the source instance holds at the source location
        self.registry.flush()
        records = self.registry.instance_workers(source[0])
        index = self.registry.index_of(records[0]) if records else self.index
        detail = index.lookup_detailed(tokens) if tokens and index is not None else {}
        held = detail.get(source[0], {}).get("locations", {}).get(source[1], 0)
        event_id = self.event_ids.new("Move")
        self.ops.start_move(event_id, source, target, pack_u32s(tokens[:held]), copy)
        return _ok({"event_id": event_id, "num_tokens": held})

    def health(self, request: Request):
        data = _parse(request.body)
        instance_id = _field(data, "instance_id", str, "a string")
        event_id = self.event_ids.new("Health")

        async def run() -> Response:
            codes = await self.ops.health(instance_id)
            self.ops.events.finish(event_id)
            return _ok({"event_id": event_id, "error_codes": codes})

        return run()

    def check_finish(self, request: Request) -> Response:
        data = _parse(request.body)
        event_id = _field(data, "event_id", str, "a string")
        status = self.ops.events.get(event_id)
        out = {"status": status}
        error = self.ops.events.errors.get(event_id)
        if error:
            out["error"] = error
        return _ok(out)

    def query_worker_info(self, request: Request):
        data = _parse(request.body)
        instance_id = _field(data, "instance_id", str, "a string")
        worker_ids = _field(data, "worker_ids", list, "a list of worker ids", optional=True)
        if worker_ids is not None and not all(type(w) is int for w in worker_ids):
            raise BadRequest("field 'worker_ids' must be a list of integers")
        event_id = self.event_ids.new("QueryWorkerInfo")

        async def run() -> Response:
            if instance_id == "all":
                infos = []
                for each in self.registry.instances():
                    infos += await self.ops.worker_info(each, worker_ids, missing_ok=True)
            else:
                infos = await self.ops.worker_info(instance_id, worker_ids)
            return _ok({"event_id": event_id, "worker_infos": infos})

        return run()

    def query_instance(self, request: Request) -> Response:
        data = _parse(request.body)
        ip = _field(data, "ip", str, "a host address")
        event_id = data.get("event_id")
        if not isinstance(event_id, str) or not event_id:
            event_id = self.event_ids.new("QueryInst")
        for instance_id, records in self.registry.instances().items():
            if any(r.host == ip or r.p2p_host == ip for r in records):
                return _ok({"event_id": event_id, "res": instance_id})
        raise OperationError(404, f"no instance has a worker at {ip!r}")

    # -- observability ---------------------------------------------------------------------
    def healthz(self, request: Request) -> Response:
        replication = self.c.replication
        if replication is None:
            return _ok({"status": "ok", "workers": len(self.registry.workers)})
        state = replication.state()
        return (200 if state["ready"] else 503, JSON, json.dumps(state).encode())

    def _indexes(self) -> list[Any]:
        """Every key space's index (ours first)."""
        out = [self.index]
        if self.c.lmcache is not None:
            out.append(self.c.lmcache.index)
        if self.c.kv_events is not None:
            out.extend(ns.index for ns in self.c.kv_events.namespaces.all())
        return out

    def _stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for index in self._indexes():
            for name, n in index.stats().items():
                total[name] = total.get(name, 0) + n
        return total

    def _holder_counts(self) -> list[tuple[str, int, str, int]]:
        return [row for index in self._indexes() for row in index.holder_counts()]

    def _peer_url(self, record: Any) -> str | None:
        """The worker's P2P address as it registered it: LMCache's ``peer_init_url``; ours
        host:port; None for an engine event publisher or a worker without one."""
        lmcache = self.c.lmcache
        if lmcache is not None and record.source is lmcache:
            state = lmcache.workers.get(record.key)
            return state.peer_init_url if state is not None else None
        if record.source is None and record.p2p_port:
            return f"{record.p2p_host}:{record.p2p_port}"
        return None

    def key_stats(self, request: Request) -> Response:
        counts = worker_listing.key_counts(self._holder_counts())
        return _ok(worker_listing.key_stats(self.registry.instances(), counts))

    def workers(self, request: Request) -> Response:
        try:
            instance_id, worker_id = worker_listing.parse_worker_query(request.query)
        except worker_listing.BadQuery as exc:
            raise BadRequest(str(exc)) from None
        counts = worker_listing.key_counts(self._holder_counts())
        try:
            return _ok(worker_listing.workers(self.registry.instances(), counts, self._peer_url,
                                              instance_id, worker_id))
        except worker_listing.NotFound as exc:
            raise OperationError(404, str(exc)) from None

    def metrics_page(self, request: Request) -> Response:
        return (200, PROMETHEUS, self.exposition.render())

    def dashboard(self, request: Request) -> Response:
        return (200, HTML, DASHBOARD_HTML)

    def dashboard_json(self, request: Request) -> Response:
        self.registry.flush()
        holders: dict[tuple[str, int], dict[str, int]] = {}
        for instance_id, worker_id, location, n in self._holder_counts():
            holders.setdefault((instance_id, worker_id), {})[location] = n
        instances = []
        now = time.monotonic()
        for instance_id, records in self.registry.instances().items():
            locations: dict[str, int] = {}
            workers = []
            for r in records:
                held = holders.get(r.key, {})
                for loc, n in held.items():
                    locations[loc] = max(locations.get(loc, 0), n)
                workers.append({
                    "worker_id": r.worker_id, "host": r.host, "worker_port": r.worker_port,
                    "p2p": f"{r.p2p_host}:{r.p2p_port}", "state": worker_state(r),
                    "last_seen_s": round(now - r.last_seen, 1), "chunks": held,
                })
            instances.append({"instance_id": instance_id, "workers": workers, "locations": locations})
        stats = self._stats()
        m = self.metrics
        lookup_rate, ingest_rate = self.c.history.last_rates()
        return _ok({
            "instances": instances,
            "chunks": stats.get("chunks", 0),
            "holdings": stats.get("holdings", 0),
            "lookups": m.total_lookups(),
            "lookup_rate": round(lookup_rate, 1),
            "ingest_rate": round(ingest_rate, 1),
            "history": self.c.history.series(),
            "uptime_s": round(time.time() - m.started, 1),
            "chunk_size": self.chunk_size,
            "kv_event_publishers": self.c.kv_events.describe() if self.c.kv_events is not None else [],
            "kv_events_skipped": self.c.kv_events.skipped() if self.c.kv_events is not None else {},
        })


def _audit(path: str, request: Request, result: Response) -> None:
    """One INFO line per request that changes what workers hold: who, what, and the outcome."""
    body = request.body[:160].decode("utf-8", "replace")
    more = "..." if len(request.body) > 160 else ""
    log.info("%s from %s: %d %s (request %s%s)", path, request.peer, result[0],
             result[2][:200].decode("utf-8", "replace"), body, more)


def _truthy(query: bytes, name: bytes) -> bool:
    values = parse_qs(query.decode("latin-1")).get(name.decode())
    return bool(values) and values[-1].lower() in ("1", "true", "yes", "on")
