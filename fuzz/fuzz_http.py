#!/usr/bin/env python3
"""Fuzz target ``http``: bytes into the controller's HTTP protocol, through a fake transport.

The whole request path runs: httptools parsing, limits (small ones here, so short inputs
reach them), routing, every endpoint's validation, the native /lookup, the management
endpoints against three registered workers whose command connection is a stub that
answers at once, flow control, EOF and the sweeper's timeouts.

Input: the first byte chooses raw mode (the rest is the byte stream as sent) or
structured mode (the rest builds near-valid requests: real paths and methods, headers,
JSON bodies with right and wrong fields), how the stream is cut into reads, whether the
client half-closes, whether the timeouts fire and whether the controller has an API key
(``k``). Checked after every input:

* what the server wrote is well-formed HTTP/1.1; no 500; every 4xx/5xx body is
  ``{"error": str}``; every 200 from /lookup is the spec's layout;
* the controller logged no ERROR (a handler that raised);
* the connection is gone from the server's set once closed, with no task left behind;
* the index is exactly as before unless a /clear was answered 200 (the only endpoint
  that changes it); then it is re-seeded;
* with an API key, no endpoint that changes state ran for a request without that key.

Run: ``python fuzz/fuzz_http.py [libFuzzer flags] [corpus dirs]`` (see fuzz/run.py).
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from gen import Reader, json_text, nest, tokens, value  # noqa: E402

if __name__ == "__main__":  # under the fuzzer: instrument our modules before anything imports them
    import atheris

    with atheris.instrument_imports(include=["lmcache_rs"]):
        import lmcache_rs.controller.server  # noqa: F401

from lmcache_rs import Index
from lmcache_rs.controller.api import MUTATING
from lmcache_rs.controller.http import HttpProtocol, Sweeper
from lmcache_rs.controller.registry import LIVE, WorkerRecord
from lmcache_rs.controller.server import Controller
from lmcache_rs.controller.settings import Settings

MAX_BODY = 16384
MAX_HEADER = 1024

PATHS = ["/lookup", "/lookup?detail=1", "/clear", "/pin", "/unpin", "/move", "/compress", "/decompress", "/health",
         "/check_finish", "/query_worker_info", "/query_instance", "/metrics", "/healthz", "/", "/dashboard.json",
         "/controller/key-stats", "/controller/workers", "/controller/workers?instance_id=inst_a&worker_id=1",
         "/controller/workers?worker_id=%ff&instance_id=nope", "/nope", "/lookup?detail=true&x=%ff", "*", "http://a/lookup", "/lookup/../metrics", "//lookup"]
METHODS = ["POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "CONNECT", "PATCH", "post", "X"]
HEADERS = [
    ("Content-Type", "application/json"), ("Connection", "close"), ("Connection", "keep-alive"),
    ("Expect", "100-continue"), ("Transfer-Encoding", "chunked"), ("Content-Length", "5"),
    ("Content-Length", "-1"), ("Content-Length", "99999999999999999999"), ("Content-Length", "1, 2"),
    ("Upgrade", "websocket"), ("Host", ""), ("X-Api-Key", "k"), ("Authorization", "Bearer k"),
    ("Authorization", "bearer  k "), ("X-API-KEY", "K"), ("Authorization", "k"), ("X-Api-Key", ""),
]
# Fields each endpoint reads, with a valid value for each.
FIELDS = {
    "/lookup": {"tokens": lambda r: harness.PROMPTS[r.below(len(harness.PROMPTS))][: r.below(13)]},
    "/clear": {"instance_id": lambda r: r.pick(["inst_a", "inst_b"]), "location": lambda r: r.pick(LOCS + ["all"])},
    "/pin": {"instance_id": lambda r: r.pick(["inst_a", "inst_b"]), "location": lambda r: r.pick(LOCS),
             "tokens": tokens},
    "/compress": {"instance_id": lambda r: r.pick(["inst_a", "inst_b"]), "location": lambda r: r.pick(LOCS),
                  "tokens": tokens, "method": lambda r: r.pick(["zstd", "lz4", "cachegen"])},
    "/move": {"old_position": lambda r: [r.pick(["inst_a", "inst_b"]), r.pick(LOCS)],
              "new_position": lambda r: [r.pick(["inst_a", "inst_b"]), r.pick(LOCS)],
              "tokens": tokens, "copy": lambda r: bool(r.byte() & 1)},
    "/health": {"instance_id": lambda r: r.pick(["inst_a", "inst_b", "nope"])},
    "/check_finish": {"event_id": lambda r: r.pick(["Move-0-1", "x", ""])},
    "/query_worker_info": {"instance_id": lambda r: r.pick(["inst_a", "inst_b"]),
                           "worker_ids": lambda r: [r.below(3) for _ in range(r.below(3))]},
    "/query_instance": {"ip": lambda r: r.pick(["127.0.0.1", "10.0.0.1"]), "event_id": lambda r: "e"},
}
FIELDS["/unpin"] = FIELDS["/pin"]
FIELDS["/decompress"] = FIELDS["/compress"]
LOCS = [harness.CPU, harness.GPU, harness.DISK]


class StubCommand:
    """A worker's command connection that answers every op at once (no network)."""

    closed = False

    def __init__(self, record: WorkerRecord):
        self.record = record

    async def call(self, op: str, args: dict | None = None):
        if op == "clear":
            return {"cleared": 2}
        if op == "health":
            return {"ok": True, "chunks": 3, "locations": {harness.CPU: 3}}
        if op == "info":
            return {"instance_id": self.record.instance_id, "worker_id": self.record.worker_id,
                    "locations": {harness.CPU: {"chunks": 3, "bytes": 96, "capacity": 1 << 20}}}
        if op == "fetch":
            return {"chunks": 1, "tokens": 4}
        return {"chunks": 1, "bytes_before": 64, "bytes_after": 32}

    def close(self) -> None:
        pass


API_KEY = "k"


class Target:
    def __init__(self, api_key: str | None = None, loop=None, fast: bool = True) -> None:
        self.errors = harness.quiet_logs()
        self.loop = loop or harness.new_loop()
        self.api_key = api_key
        settings = Settings(host="127.0.0.1", chunk_size=harness.CHUNK, hash_seed=harness.SEED,
                            max_body_bytes=MAX_BODY, max_header_bytes=MAX_HEADER, max_pipelined=4,
                            max_connections=64, keepalive_timeout=5.0, request_timeout=2.0, api_key=api_key)
        self.index = Index(harness.CHUNK, harness.SEED)
        self.controller = Controller(settings, self.index)
        registry = self.controller.registry
        for instance_id, worker_id in (("inst_a", 0), ("inst_b", 0), ("inst_b", 1)):
            record = WorkerRecord(instance_id, worker_id)
            record.host, record.worker_port, record.p2p_host, record.p2p_port = "127.0.0.1", 1, "127.0.0.1", 2
            record.state = LIVE
            record.registered_at = record.last_seen_wall = 1.7e9  # the same in both twins
            record.command = StubCommand(record)  # type: ignore[assignment]
            registry.workers[record.key] = record
            self.index.register_worker(instance_id, worker_id)
        harness.seed_index(self.index)
        self.baseline = harness.digest(self.index)
        self.state = self.controller.http_state
        if not fast:  # every request through the general parser (the reference for the fast path)
            self.state.fast_lookup = None
        self.sweeper = Sweeper(self.state)
        self.seen: list[tuple[bytes, bytes, list, bool]] = []  # method, path, [status], carried the key
        api = self.state.app
        key = api_key.encode() if api_key is not None else None

        def recording_app(request):
            status: list = []
            self.seen.append((request.method, request.path, status, key is None or request.credential == key))
            result = api(request)
            if inspect.isawaitable(result):
                return self._await(result, status)
            status.append(result[0])
            return result

        self.state.app = recording_app

    @staticmethod
    async def _await(awaitable, status: list):
        result = await awaitable
        status.append(result[0])
        return result

    def reseed(self) -> None:
        for instance_id in ("inst_a", "inst_b"):
            self.index.clear(instance_id)
        harness.seed_index(self.index)
        if harness.digest(self.index) != self.baseline:
            raise harness.Finding("re-seeding did not restore the index")

    # -- one input ---------------------------------------------------------------------------
    def __call__(self, data: bytes) -> bytes:
        return self.loop.run_until_complete(self.one(data))

    async def one(self, data: bytes) -> None:
        r = Reader(data)
        flags = r.byte()
        stream = structured(r) if flags & 1 else r.rest()
        pieces = harness.split_reads(stream, flags >> 4, data)
        self.seen.clear()
        proto = HttpProtocol(self.state)
        transport = harness.attach(proto)
        for piece in pieces:
            if transport.closed:
                break
            if not transport.reading:  # paused by flow control: let the queue drain first
                await harness.settle()
            proto.data_received(piece)
        if flags & 2 and not transport.closed:
            if not proto.eof_received():
                transport.close()
        await harness.settle(6)
        if flags & 4:
            now = self.loop.time()
            self.sweeper.sweep(now)
            self.sweeper.sweep(now + 10_000)
            await harness.settle()
        written = bytes(transport.written)
        transport.close()
        await harness.settle(3)
        self.check(proto, written, heads=b"HEAD" in stream)
        return written

    def check(self, proto: HttpProtocol, written: bytes, heads: bool = False) -> None:
        self.errors.check()
        for method, path, status, keyed in self.seen:
            if not keyed and method == b"POST" and path.decode("latin-1") in MUTATING and status and status[0] != 401:
                raise harness.Finding(f"{path!r} answered {status[0]} to a request without the API key")
        for status, _headers, body in harness.parse_http_responses(written, heads):
            if status >= 500 and status != 503:
                raise harness.Finding(f"server answered {status}: {body[:300]!r}")
            if status >= 400 and not (heads and body == b""):  # a HEAD's answer has no body
                try:
                    err = json.loads(body)["error"]
                except Exception:
                    raise harness.Finding(f"{status} without a JSON error body: {body[:300]!r}") from None
                if not isinstance(err, str):
                    raise harness.Finding(f"{status} error is not a string: {body[:300]!r}")
        if proto in self.state.connections:
            raise harness.Finding("a closed connection stayed in the server's connection set")
        if any(not t.done() for t in proto.tasks):
            raise harness.Finding("a task outlived its connection")
        changed = any(path == b"/clear" and method == b"POST" and status and status[0] == 200
                      for method, path, status, _ in self.seen)
        now = harness.digest(self.index)
        if now != self.baseline:
            if not changed:
                raise harness.Finding(f"index changed by requests that were all refused: {self.seen!r:.500}")
            self.reseed()


def structured(r: Reader) -> bytes:
    """One to three near-valid requests."""
    out = bytearray()
    for _ in range(1 + r.below(3)):
        method = r.pick(METHODS) if r.below(4) == 0 else ("GET" if r.below(5) == 0 else "POST")
        path = r.pick(PATHS)
        body = body_for(path.split("?")[0], r)
        lines = [f"{method} {path} HTTP/1.{r.below(2) if r.below(6) == 0 else 1}"]
        if r.below(8):
            lines.append("Host: 127.0.0.1")
        for _ in range(r.below(3)):
            k, v = r.pick(HEADERS)
            lines.append(f"{k}: {v}")
        if r.below(10) == 0:
            lines.append("X-Pad: " + "a" * (r.u16() % (2 * MAX_HEADER)))
        how = r.below(8)
        if how == 0:  # chunked
            lines.append("Transfer-Encoding: chunked")
            cut = r.below(len(body) + 1)
            parts = [p for p in (body[:cut], body[cut:]) if p]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        elif how == 1:  # a declared length that lies
            lines.append(f"Content-Length: {max(0, len(body) + r.below(7) - 3)}")
            payload = body
        elif how == 2:  # a declared length over the limit
            lines.append(f"Content-Length: {MAX_BODY + 1 + r.u16()}")
            payload = body
        else:
            lines.append(f"Content-Length: {len(body)}")
            payload = body
        out += ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + payload
    if r.below(4) == 0:
        out += r.rest()  # trailing garbage
    return bytes(out)


def body_for(path: str, r: Reader) -> bytes:
    fields = FIELDS.get(path)
    how = r.below(10)
    if fields is None or how == 0:
        return json_text(value(r), r)
    if how == 1:
        return nest(r).encode()
    if how == 2:
        return r.take(r.below(64))
    obj = {}
    for name, make in fields.items():
        choice = r.below(6)
        if choice == 0:
            continue  # missing
        obj[name] = value(r) if choice == 1 else make(r)
    if r.below(5) == 0:
        obj[str(value(r))[:16]] = value(r)  # an extra field
    return json_text(obj, r)


_targets: dict[tuple[bool, bool], Target] = {}
_EVENT_TAG = re.compile(rb'"([A-Za-z]+)-[0-9a-f]{8}-(\d+)"')


def normalised(written: bytes) -> list[tuple[int, dict, bytes]]:
    """Responses with what may differ between two servers taken out: the random event-id tag,
    and the bodies of /metrics and /dashboard.json (timings, uptime)."""
    out = []
    for status, headers, body in harness.parse_http_responses(written, heads=True):
        # (a HEAD's answer has no body to tell: its length may be one of those pages' too)
        if body.startswith(b"# HELP") or b'"uptime_s"' in body or (body == b"" and headers["content-length"] != "0"):
            body, headers = b"<timings>", {k: v for k, v in headers.items() if k != "content-length"}
        out.append((status, headers, _EVENT_TAG.sub(rb'"\1-T-\2"', body)))
    return out


def test_one_input(data: bytes) -> None:
    """The input through the controller as configured (the /lookup fast path on), then through a
    twin whose fast path is off: both must pass every check and answer the same bytes."""
    keyed = bool(data and data[0] & 8)
    answers = []
    for fast in (True, False):
        target = _targets.get((keyed, fast))
        if target is None:
            other = next(iter(_targets.values()), None)
            target = _targets[(keyed, fast)] = Target(API_KEY if keyed else None, other.loop if other else None, fast)
        answers.append(target(data))
    if answers[0] != answers[1] and normalised(answers[0]) != normalised(answers[1]):
        raise harness.Finding(f"the /lookup fast path answered differently from the general parser:\n"
                              f"fast:    {answers[0][:600]!r}\nparser:  {answers[1][:600]!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
