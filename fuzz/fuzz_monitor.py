#!/usr/bin/env python3
"""Fuzz target ``monitor``: frames into the controller's monitor protocol, through a fake transport.

Each input is one worker connection to a fresh controller state (registry + native index
seeded with other workers' holdings). The first byte chooses:

* bit 0 -- a prelude: a valid hello and full sync first, so the fuzzed frames meet a live
  worker (events, heartbeats, resyncs, pings, a second sync, bye);
* bit 1 -- structured frames (msgpack maps of every message type with right, wrong, missing
  and extra fields, plus the odd damaged frame) instead of raw bytes;
* bit 2 -- the controller requires an API key in hello;
* bit 3 -- the connection drops at the end without bye, then the heartbeat timeout passes;
* bits 4-6 -- how many reads the stream is cut into.

Checked for every frame and input:

* a frame the controller refuses (``error`` frame) or answers with ``resync`` leaves the
  index exactly as it was before that frame (stats, holders, workers, fixed lookups);
* the controller writes only well-formed frames of the kinds it may send, never an
  ``internal_error``, and logs no ERROR;
* after the input, ``check_invariants`` holds; a dropped worker's holdings are gone once
  the heartbeat timeout passes, and nothing else changed then.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from gen import Reader, value  # noqa: E402

if __name__ == "__main__":  # under the fuzzer: instrument our modules before anything imports them
    import atheris

    with atheris.instrument_imports(include=["lmcache_rs"]):
        import lmcache_rs.controller.server  # noqa: F401

from lmcache_rs import Index, chunk_hashes
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.monitor import MonitorProtocol, MonitorServerState
from lmcache_rs.controller.registry import Registry
from lmcache_rs.controller.settings import Settings
from lmcache_rs.wire import FrameDecoder, FrameError, encode_frame, pack_u64s
from lmcache_rs.wire.report import PROTOCOL_VERSION

import msgpack  # noqa: E402

MAX_FRAME = 4096
API_KEY = "s3cret"
INSTANCE, WORKER = "inst_c", 0
KEYS = [k for p in harness.PROMPTS for k in chunk_hashes(p, harness.CHUNK, harness.SEED)]
SENDS = {"welcome", "error", "resync", "pong"}
LOCS = [harness.CPU, harness.GPU, harness.DISK]
TYPES = ["hello", "heartbeat", "sync_start", "sync_chunk", "sync_end", "events", "ping", "bye",
         "welcome", "error", "resync", "pong", "reply", "command", "zzz"]


def hello(api_key: str | None = None) -> dict:
    m = {"t": "hello", "v": PROTOCOL_VERSION, "instance_id": INSTANCE, "worker_id": WORKER, "world_size": 1,
         "host": "127.0.0.1",
         "worker_port": 8001, "p2p_host": "127.0.0.1", "p2p_port": 8200, "chunk_size": harness.CHUNK,
         "seed": harness.SEED}
    if api_key is not None:
        m["api_key"] = api_key
    return m


def hashes(r: Reader) -> bytes:
    how = r.below(8)
    if how == 0:
        return r.take(r.below(20))  # any length, maybe not a multiple of 8
    keys = [KEYS[r.below(len(KEYS))] for _ in range(r.below(6))]
    if how == 1:
        keys.append(r.byte() << 56 | r.u16())
    return pack_u64s(keys)


# The fields of each message type, with a generator of a valid value.
FIELDS = {
    "hello": {k: (lambda v: lambda r: v)(v) for k, v in hello(API_KEY).items() if k != "t"},
    "heartbeat": {"seq": lambda r: r.below(6)},
    "sync_start": {"seq": lambda r: r.below(6)},
    "sync_chunk": {"location": lambda r: r.pick(LOCS), "hashes": hashes},
    "sync_end": {"count": lambda r: r.below(12)},
    "events": {"seq": lambda r: r.below(6),
               "ops": lambda r: [[r.pick(["admit", "evict"]), r.pick(LOCS), hashes(r)] for _ in range(r.below(4))]},
    "ping": {"id": lambda r: r.below(100)},
}


def structured_frames(r: Reader) -> bytes:
    out = bytearray()
    for _ in range(1 + r.below(8)):
        kind = r.pick(TYPES)
        m: dict = {"t": kind}
        for name, make in FIELDS.get(kind, {}).items():
            choice = r.below(10)
            if choice == 0:
                continue
            m[name] = value(r, 2) if choice == 1 else make(r)
        if kind == "events" and "ops" in m and isinstance(m["ops"], list) and r.below(6) == 0:
            m["ops"].append(value(r, 2))  # one malformed op among good ones
        if r.below(8) == 0:
            m[str(value(r, 3))[:10]] = value(r, 3)
        if r.below(12) == 0:
            del m["t"]
        try:
            body = msgpack.packb(m, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            body = msgpack.packb({"t": kind}, use_bin_type=True)
        damage = r.below(16)
        if damage == 0:
            body = body[: r.below(len(body) + 1)]  # truncated msgpack, honest length
        elif damage == 1:
            body = msgpack.packb([kind, 1])  # not a map
        elif damage == 2:
            out += (MAX_FRAME + 1 + r.u16()).to_bytes(4, "big")  # oversized length
            continue
        elif damage == 3:
            out += len(body).to_bytes(4, "big") + body[:-1]  # cut mid-frame (at the end of the stream)
            break
        out += len(body).to_bytes(4, "big") + body
    return bytes(out)


class Conn:
    def __init__(self, settings: Settings):
        self.index = Index(harness.CHUNK, harness.SEED)
        harness.seed_index(self.index)
        self.metrics = Metrics()
        self.registry = Registry(self.index, self.metrics, settings.heartbeat_timeout)
        self.state = MonitorServerState(settings, self.metrics, self.registry)
        self.proto = MonitorProtocol(self.state)
        self.transport = harness.attach(self.proto)
        self.last_good = harness.digest(self.index)
        self.frames = 0
        self.finding: harness.Finding | None = None  # the protocol catches what dispatch raises
        inner_dispatch, inner_reject = self.proto.dispatch, self.proto.reject

        def dispatch(message: dict) -> None:
            # every earlier frame was flushed and digested: the index is still last_good
            before = self.last_good
            resyncs = self.metrics.resyncs
            try:
                inner_dispatch(message)
            except FrameError:
                self.registry.flush()
                if harness.digest(self.index) != before:
                    self.finding = harness.Finding(f"a refused {message.get('t')!r} frame changed the index")
                    raise self.finding from None
                raise
            self.registry.flush()
            after = harness.digest(self.index)
            if self.metrics.resyncs != resyncs and after != before:
                self.finding = harness.Finding(f"a {message.get('t')!r} frame answered with resync changed the index")
                raise self.finding
            self.last_good = after
            self.frames += 1

        def reject(code: str, message: str) -> None:
            if self.finding is not None:
                raise self.finding
            if code == "internal_error":
                raise harness.Finding(f"internal_error: {message}")
            self.registry.flush()
            if harness.digest(self.index) != self.last_good:
                raise harness.Finding(f"a frame refused with {code} changed the index")
            inner_reject(code, message)

        self.proto.dispatch = dispatch  # type: ignore[method-assign]
        self.proto.reject = reject  # type: ignore[method-assign]


class Target:
    def __init__(self) -> None:
        self.errors = harness.quiet_logs()
        self.loop = harness.new_loop()
        common = dict(chunk_size=harness.CHUNK, hash_seed=harness.SEED, max_frame_bytes=MAX_FRAME,
                      max_hello_frame_bytes=512, heartbeat_timeout=10.0)
        self.settings = Settings(**common)
        self.keyed = Settings(api_key=API_KEY, **common)

    def __call__(self, data: bytes) -> None:
        self.loop.run_until_complete(self.one(data))

    async def one(self, data: bytes) -> None:
        r = Reader(data)
        flags = r.byte()
        c = Conn(self.keyed if flags & 4 else self.settings)
        stream = bytearray()
        if flags & 1:
            keys = [KEYS[i] for i in range(r.below(len(KEYS)))]
            stream += encode_frame(hello(API_KEY if r.below(4) else None))
            stream += encode_frame({"t": "sync_start", "seq": 0})
            stream += encode_frame({"t": "sync_chunk", "location": harness.CPU, "hashes": pack_u64s(keys)})
            stream += encode_frame({"t": "sync_end", "count": len(keys)})
        stream += structured_frames(r) if flags & 2 else r.rest()
        pieces = harness.split_reads(bytes(stream), (flags >> 4) & 7, data)
        for piece in pieces:
            if c.transport.closed:
                break
            c.proto.data_received(piece)
        await harness.settle(2)
        self.errors.check()
        self.check_output(c)
        c.registry.flush()
        c.index.check_invariants()
        if flags & 8 and not c.transport.closed:
            c.transport.close()  # dropped without bye
            await harness.settle(2)
        if c.transport.closed:
            await self.check_expiry(c)
        else:
            c.transport.close()
            await harness.settle(2)
        self.errors.check()

    @staticmethod
    def check_output(c: Conn) -> None:
        try:
            sent = FrameDecoder(1 << 20).feed(bytes(c.transport.written))
        except FrameError as exc:
            raise harness.Finding(f"the controller wrote a malformed frame: {exc}") from None
        for m in sent:
            if m["t"] not in SENDS:
                raise harness.Finding(f"the controller sent a {m['t']!r} frame on the report connection")
            if m["t"] == "error" and (not isinstance(m.get("code"), str) or not isinstance(m.get("message"), str)):
                raise harness.Finding(f"error frame without code/message: {m!r:.200}")
        if any(m["t"] == "error" for m in sent[:-1]):
            raise harness.Finding("the controller kept talking after an error frame")

    @staticmethod
    async def check_expiry(c: Conn) -> None:
        """Once the connection is gone and the heartbeat timeout passes, the worker's holdings go
        (whatever (instance, worker) it said hello as, a seeded one included) and nothing else."""
        import time

        gone = set(c.registry.workers)
        others_before = sorted(h for h in c.index.holder_counts() if (h[0], h[1]) not in gone)
        c.registry.expire(time.monotonic() + c.registry.heartbeat_timeout + 1)
        if c.registry.workers:
            raise harness.Finding("a worker outlived its heartbeat timeout")
        held = [h for h in c.index.holder_counts() if (h[0], h[1]) in gone]
        if held:
            raise harness.Finding(f"holdings of an expired worker remain: {held}")
        if sorted(c.index.holder_counts()) != others_before:
            raise harness.Finding("expiring one worker changed other workers' holdings")
        c.index.check_invariants()


_target: Target | None = None


def test_one_input(data: bytes) -> None:
    global _target
    if _target is None:
        _target = Target()
    _target(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
