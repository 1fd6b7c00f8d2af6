"""Write the hand-made seeds of the checked-in corpus (fuzz/corpus/<target>/seed-*).

    python fuzz/seeds.py

Seeds are valid or nearly valid inputs of each kind, so the fuzzer starts past the
first checks. The rest of the corpus (files named by their SHA-1) was kept by libFuzzer's
``-merge=1`` from long runs; both kinds are replayed by the test suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import msgpack  # noqa: E402

CORPUS = HERE / "corpus"


def http_seeds() -> dict[str, bytes]:
    def req(method: str, path: str, body: bytes | None = None, extra: str = "") -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + (body or b"")

    def j(obj) -> bytes:
        return json.dumps(obj).encode()

    raw = {  # flag byte 0x00: raw stream, one read
        "lookup": req("POST", "/lookup", j({"tokens": harness.PROMPTS[0]})),
        "lookup-detail": req("POST", "/lookup?detail=1", j({"tokens": harness.PROMPTS[1]})),
        "lookup-pipelined": req("POST", "/lookup", j({"tokens": [1, 2, 3, 4]})) * 3,
        "clear": req("POST", "/clear", j({"instance_id": "inst_a", "location": harness.CPU})),
        "pin": req("POST", "/pin", j({"instance_id": "inst_b", "location": harness.CPU, "tokens": [1, 2, 3, 4]})),
        "compress": req("POST", "/compress", j({"instance_id": "inst_a", "location": harness.GPU,
                                                "tokens": [1, 2], "method": "zstd"})),
        "move": req("POST", "/move", j({"old_position": ["inst_a", harness.CPU],
                                        "new_position": ["inst_b", harness.GPU], "tokens": [1, 2, 3, 4]})),
        "health": req("POST", "/health", j({"instance_id": "inst_b"})),
        "check_finish": req("POST", "/check_finish", j({"event_id": "Move-x-1"})),
        "worker_info": req("POST", "/query_worker_info", j({"instance_id": "inst_b", "worker_ids": [0, 1]})),
        "query_instance": req("POST", "/query_instance", j({"ip": "127.0.0.1"})),
        "gets": req("GET", "/metrics") + req("GET", "/healthz") + req("GET", "/dashboard.json") + req("GET", "/"),
        "chunked": (b"POST /lookup HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\n{\"tok\r\n9\r\nens\": []}\r\n0\r\n\r\n"),
        "expect": req("POST", "/lookup", j({"tokens": []}), "Expect: 100-continue\r\n"),
        "close": req("POST", "/lookup", j({"tokens": [7, 7, 7, 7]}), "Connection: close\r\n") + b"GET / HTTP/1.1\r\n\r\n",
        "http10": b"POST /lookup HTTP/1.0\r\nContent-Length: 13\r\n\r\n{\"tokens\":[]}",
        "too-large": b"POST /lookup HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n{\"tokens\":",
        "bad-length": b"POST /lookup HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
        "slow-head": b"POST /lookup HTTP/1.1\r\nHost: a\r\nX-A: b",
        "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    }
    seeds = {f"seed-{k}": b"\x00" + v for k, v in raw.items()}
    seeds["seed-lookup-split-eof-sweep"] = b"\x76" + raw["lookup-pipelined"]
    seeds["seed-slow-head-sweep"] = b"\x04" + raw["slow-head"]
    # bit 3: the controller has the API key "k"
    seeds["seed-keyed-clear-without-key"] = b"\x08" + raw["clear"]
    seeds["seed-keyed-clear-with-key"] = b"\x08" + req("POST", "/clear", j({"instance_id": "inst_a"}),
                                                      "Authorization: Bearer k\r\n")
    seeds["seed-keyed-pin-x-api-key"] = b"\x08" + req("POST", "/pin", j({"instance_id": "inst_b", "tokens": [1]}),
                                                     "X-API-Key: k\r\n")
    for n in range(8):  # structured mode with a few different choices
        seeds[f"seed-structured-{n}"] = bytes([1 | (n << 4), n, 3 * n, 7, n * 11 % 256, 2, 0, 5, 1]) + bytes(range(n, 40))
    return seeds


def lookup_json_seeds() -> dict[str, bytes]:
    bodies = {
        "prompt": json.dumps({"tokens": harness.PROMPTS[0]}),
        "empty": '{"tokens": []}',
        "extra": '{"model": "m", "tokens": [1, 2, 3, 4, 5], "x": {"y": [null, true, 1.5, "s"]}}',
        "dup": '{"tokens": [1], "tokens": [2]}',
        "neg": '{"tokens": [-1]}',
        "big": '{"tokens": [4294967295, 4294967296]}',
        "float": '{"tokens": [1.0]}',
        "string": '{"tokens": "1 2 3"}',
        "nested": '{"tokens": [1], "x": ' + "[" * 200 + "]" * 200 + "}",
        "escape": '{"tok\\u0065ns": [5, 4, 3, 2, 1]}',
        "surrogate": '{"x": "\\ud800", "tokens": [1]}',
        "not-object": "[1, 2, 3]",
        "trailing": '{"tokens": [1]} x',
    }
    seeds = {f"seed-{k}": b"\x00" + v.encode() for k, v in bodies.items()}
    seeds["seed-prompt-detail"] = b"\x02" + bodies["prompt"].encode()
    for n in range(6):
        seeds[f"seed-structured-{n}"] = bytes([1 | (n & 2), n, 5, 2 * n, 9, 1, 3, n]) + bytes(range(n, 30))
    return seeds


def _frame(m: dict) -> bytes:
    body = msgpack.packb(m, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def monitor_seeds() -> dict[str, bytes]:
    import fuzz_monitor as fm

    keys = fm.pack_u64s(fm.KEYS[:5])
    live = [  # sent after the prelude (flag bit 0; then a byte for its key count and one for its api_key)
        {"t": "events", "seq": 1, "ops": [["admit", harness.GPU, keys], ["evict", harness.CPU, keys[:8]]]},
        {"t": "heartbeat", "seq": 1},
        {"t": "ping", "id": 1},
        {"t": "events", "seq": 3, "ops": []},  # a gap: resync
        {"t": "sync_start", "seq": 3},
        {"t": "sync_chunk", "location": harness.DISK, "hashes": keys},
        {"t": "events", "seq": 4, "ops": [["admit", harness.CPU, keys[:16]]]},
        {"t": "sync_end", "count": 5},
        {"t": "bye"},
    ]
    seeds = {
        "seed-live-session": b"\x01" + b"\x05\x01" + b"".join(_frame(m) for m in live),
        "seed-live-then-drop": b"\x09" + b"\x03\x01" + b"".join(_frame(m) for m in live[:3]),
        "seed-raw-hello": b"\x00" + _frame(fm.hello()) + _frame({"t": "sync_start", "seq": 0})
        + _frame({"t": "sync_chunk", "location": harness.CPU, "hashes": keys}) + _frame({"t": "sync_end", "count": 5}),
        "seed-keyed-hello": b"\x04" + _frame(fm.hello(fm.API_KEY)),
        "seed-keyed-wrong": b"\x04" + _frame(fm.hello("nope")),
        "seed-mismatch": b"\x00" + _frame({**fm.hello(), "chunk_size": 256, "seed": 0}),
        "seed-no-hello": b"\x00" + _frame({"t": "events", "seq": 1, "ops": []}),
        "seed-oversized": b"\x00" + (10**6).to_bytes(4, "big") + b"\x80",
        "seed-bad-msgpack": b"\x00" + b"\x00\x00\x00\x02\xc1\xc1",
        "seed-not-map": b"\x00" + b"\x00\x00\x00\x01\x90",
        "seed-mid-frame": b"\x08" + _frame(fm.hello())[:-3],
        "seed-bad-events": b"\x01\x00\x01" + _frame({"t": "events", "seq": 1, "ops": [["admit", harness.CPU, b"123"]]}),
        "seed-reserved-id": b"\x00" + _frame({**fm.hello(), "instance_id": "event_id"}),
    }
    for n in range(8):
        seeds[f"seed-structured-{n}"] = bytes([2 | (n & 1) | (n << 4) & 0x70, n, 1, 2 * n, 4, 5, n, 3]) + bytes(range(n, 60))
    return seeds


def frames_seeds() -> dict[str, bytes]:
    msgs = [{"t": "hello", "v": 1}, {"t": "events", "seq": 1, "ops": [["admit", "GPU", b"\x00" * 8]]},
            {"t": "x", "f": 1.5, "n": None, "l": [1, [2, {"a": b"b"}]]}]
    stream = b"".join(_frame(m) for m in msgs)
    return {
        "seed-stream": b"\x03" + stream,
        "seed-cut": b"\x0f" + stream[:-5],
        "seed-oversized": b"\x01" + (513).to_bytes(4, "big"),
        "seed-not-map": b"\x02" + b"\x00\x00\x00\x01\x93",
        "seed-no-t": b"\x00" + _frame({"u": 1}),
        "seed-bad": b"\x05" + b"\x00\x00\x00\x03\xc1\x00\x00",
        "seed-u64": b"\x00" + b"\x01" * 16,
        "seed-ext": b"\x00" + _frame({"t": "x", "e": msgpack.ExtType(1, b"ab")}),
    }


def main() -> None:
    for target, seeds in (("http", http_seeds()), ("lookup_json", lookup_json_seeds()),
                          ("monitor", monitor_seeds()), ("frames", frames_seeds())):
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        for name, data in seeds.items():
            (d / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
