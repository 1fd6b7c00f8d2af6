"""KV-event payloads parsed in Rust (``parse_kv_batch`` + ``EngineMap.apply_parsed``) against
the Python decoder: random streams of msgpack batches, applied to one source with the native
path and to another that decodes everything in Python, give the same indexes, lookups, maps
and counts; and both match the engine map as it was in Python (tests/py_engine_blocks.py).
A payload the parser does not take (malformed, truncated, huge) changes nothing."""

from __future__ import annotations

import asyncio
import hashlib

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_rs import EngineMap, Index, parse_kv_batch
from lmcache_rs.controller.engine_blocks import MEDIUM_LOCATIONS, Namespaces, location_of
from lmcache_rs.controller import burst_reader, kv_event_source
from lmcache_rs.controller.kv_event_source import KVEventSource
from lmcache_rs.controller.kv_events import BatchError, EventDecoder
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.registry import Registry
from lmcache_rs.controller.settings import Settings
from py_engine_blocks import PyEngineBlocks

PROMPTS = [list(range(1, 25)), list(range(1, 9)) + list(range(40, 56)), list(range(60, 84)),
           [0, 2**32 - 1, 200, 70000, 300, 5] * 4]
SIZES = [4, 4, 4, 2]
MEDIA = [None, "GPU", "cpu", "CPU_TIER2", "XPU_HBM", "", "a\tb", "ſtorage", "gpu"]
TOPICS = [b"kv@pod-a@m", b"kv@pod-b@m"]


def engine_hash(tokens: list[int], end: int, form: int) -> int | bytes:
    digest = hashlib.sha256(repr(tokens[:end]).encode()).digest()
    if form == 1:
        return digest[:16]
    value = int.from_bytes(digest[-8:], "big")
    return value - 2**63 if form == 2 else value  # 2: SGLang's signed hashes


@st.composite
def stored(draw, form: int) -> dict:
    p = draw(st.integers(0, len(PROMPTS) - 1))
    prompt, size = PROMPTS[p], draw(st.sampled_from([SIZES[p], SIZES[p], SIZES[p], 2, 0]))
    n = len(prompt) // size if size else 3
    first = draw(st.integers(0, n - 1))
    last = draw(st.integers(first + 1, n))
    hashes = [engine_hash(prompt, (i + 1) * (size or 4), form) for i in range(first, last)]
    if draw(st.integers(0, 9)) == 0:
        hashes[0] = draw(st.sampled_from([1, 2, b"\x01"]))  # a reused hash
    parent = engine_hash(prompt, first * (size or 4), form) if first else None
    if first and draw(st.integers(0, 9)) == 0:
        parent = 12345  # unknown
    tokens = prompt[first * size:last * size] if size else prompt[:6]
    shape = draw(st.integers(0, 19))
    if shape == 0:
        tokens = []  # a tier update
    elif shape == 1:
        tokens = tokens[:-1]  # malformed
    elif shape == 2:
        tokens = [*tokens[:-1], 2**32]  # not u32
    event = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
             "block_size": size, "medium": draw(st.sampled_from(MEDIA))}
    extra = draw(st.integers(0, 15))
    if extra == 0:
        event["lora_name"] = "lora-1"
    elif extra == 1:
        event["extra_keys"] = [None] * len(hashes)
    elif extra == 2:
        event["extra_keys"] = [draw(st.sampled_from([None, ["salt"], [["mm", 0]]])) for _ in hashes]
    elif extra == 3:
        event["group_idx"] = draw(st.sampled_from([0, 1, None]))
    elif extra == 4:
        event["kv_cache_spec_kind"] = draw(st.sampled_from(["full_attention", "sliding_window", None]))
        event["group_idx"] = draw(st.sampled_from([0, 1]))
    elif extra == 5:
        event["surprise"] = 1
    elif extra == 6:
        event["lora_id"], event["lora_name"] = None, None
    return event


@st.composite
def events(draw, form: int) -> object:
    kind = draw(st.integers(0, 9))
    if kind < 6:
        event = draw(stored(form))
    elif kind < 9:
        p = draw(st.integers(0, len(PROMPTS) - 1))
        i = draw(st.integers(0, len(PROMPTS[p]) // SIZES[p] - 1))
        event = {"type": "BlockRemoved", "block_hashes": [engine_hash(PROMPTS[p], (i + 1) * SIZES[p], form)],
                 "medium": draw(st.sampled_from(MEDIA))}
        if draw(st.integers(0, 5)) == 0:
            event["group_idx"] = draw(st.sampled_from([0, 1]))
    else:
        event = {"type": "AllBlocksCleared"}
    if draw(st.integers(0, 19)) == 0:  # vLLM before 0.24: array-tagged
        event = [event["type"], *(v for k, v in event.items() if k != "type")]
    return event


@st.composite
def streams(draw) -> list[tuple[bytes, bytes]]:
    form = draw(st.integers(0, 2))
    out = []
    for _ in range(draw(st.integers(1, 12))):
        batch_events = draw(st.lists(events(form), max_size=6))
        shape = draw(st.integers(0, 9))
        batch = [1.0, batch_events, 0] if shape < 7 else [2, batch_events] if shape < 9 else [1.0, batch_events, None]
        out.append((draw(st.sampled_from(TOPICS)), msgspec.msgpack.encode(batch)))
    return out


def source(native: bool) -> KVEventSource:
    metrics = Metrics()
    src = KVEventSource(Settings(kv_events=[{"bind": "inproc://native-test"}]), Registry(Index(4), metrics, 10.0),
                        metrics)
    src.decoder = EventDecoder(native=native)
    return src


def feed(src: KVEventSource, stream: list[tuple[bytes, bytes]]) -> None:
    seqs: dict[bytes, int] = {}
    for topic, payload in stream:
        seq = seqs.get(topic, 0)
        seqs[topic] = seq + 1
        src.receive(0, src.subscriptions[0], topic, seq, payload)


def state(src: KVEventSource) -> dict:
    out: dict = {"counts": dict(sorted(src.counts.items())), "decoder": dict(sorted(src.decoder.counts.items())),
                 "admits": src.metrics.admits, "evicts": src.metrics.evicts,
                 "maps": {p.instance_id: p.engine.holdings() for p in src.publishers.values()}}
    for ns in src.namespaces.all():
        out[repr(ns.describe())] = (sorted(ns.index.holder_counts()), sorted(ns.engines),
                                    [sorted(ns.index.lookup(p).items()) for p in PROMPTS])
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_native_and_python_decoding_agree(stream):
    TAKEN[0] += sum(parse_kv_batch(p) is not None for _, p in stream)
    TAKEN[1] += len(stream)
    native, python = source(True), source(False)
    feed(native, stream)
    feed(python, stream)
    assert state(native) == state(python)


TAKEN = [0, 0]  # payloads the parser took, of all generated


def test_the_streams_exercise_both_paths():
    # runs after the property test above (file order): a share of each path, not all of one
    assert TAKEN[1] == 0 or 0.2 < TAKEN[0] / TAKEN[1] < 0.95, TAKEN


def reference(stream: list[tuple[bytes, bytes]]) -> tuple[dict, dict, list]:
    """The stream through the Python decoder and the Python engine map (one engine per topic,
    every message in order), as the controller applied it before the Rust map."""
    decoder, namespaces, counts = EventDecoder(native=False), Namespaces(0), {}
    engines: dict[bytes, PyEngineBlocks] = {}
    for topic, payload in stream:
        try:
            batch = decoder.decode(payload)
        except BatchError:
            continue
        engine = engines.setdefault(topic, PyEngineBlocks(topic.decode().split("@")[1], "m", namespaces, counts))
        ops: dict = {}
        engine.apply(batch.events, ops)
        for ns, ops_batch in ops.items():
            ns.index.apply_batch(ops_batch)
    indexes = [(ns.describe(), sorted(ns.index.holder_counts()), [sorted(ns.index.lookup(p).items()) for p in PROMPTS])
               for ns in namespaces.all()]
    return dict(sorted(counts.items())), {t.decode().split("@")[1]: e.blocks for t, e in engines.items()}, indexes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_the_rust_map_matches_the_python_map(stream):
    src = source(True)
    feed(src, stream)
    counts, maps, indexes = reference(stream)
    assert dict(sorted(src.counts.items())) == counts
    assert {p.instance_id: p.engine.holdings() for p in src.publishers.values()} == maps
    assert [(ns.describe(), sorted(ns.index.holder_counts()), [sorted(ns.index.lookup(p).items()) for p in PROMPTS])
            for ns in src.namespaces.all()] == indexes


def test_the_common_shape_is_taken_natively():
    a = {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None, "token_ids": list(range(8)),
         "block_size": 4, "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": [None, None],
         "group_idx": 0, "kv_cache_spec_kind": "full_attention", "kv_cache_spec_sliding_window": None}
    parsed = parse_kv_batch(msgspec.msgpack.encode([1.0, [a, {"type": "AllBlocksCleared"}], 3]))
    assert parsed is not None and (parsed.ts, parsed.dp_rank, parsed.root_sizes, parsed.cleared, len(parsed)) == \
        (1.0, 3, [4], True, 2)
    for other in ({**a, "lora_name": "x"}, {**a, "extra_keys": [["salt"], None]}, {**a, "new_field": 1},
                  {**a, "kv_cache_spec_kind": "sliding_window"},
                  {**{k: v for k, v in a.items() if k != "kv_cache_spec_kind"}, "group_idx": 1}, {**a, "medium": "ſtorage"},
                  ["BlockStored", [11], None, [1, 2, 3, 4], 4]):
        assert parse_kv_batch(msgspec.msgpack.encode([1.0, [other], 0])) is None, other


def test_media_name_the_same_locations():
    media = [*MEDIUM_LOCATIONS, *(m.lower() for m in MEDIUM_LOCATIONS), "x" * 64, "x" * 65, " ", "a~", "ÿ",
             "cuda:0", "CUDA:12", "cpu:1", "cuda:", "cuda:x", "cuda:0:1", "lmcache-l2-disk", "cuda:١"]
    stream = [(TOPICS[0], msgspec.msgpack.encode([1.0, [{
        "type": "BlockStored", "block_hashes": [i], "parent_block_hash": None, "token_ids": [i, i, i, i],
        "block_size": 4, "medium": m}], 0])) for i, m in enumerate(media)]
    native, python = source(True), source(False)
    feed(native, stream)
    feed(python, stream)
    assert state(native) == state(python)
    locations = {loc for _, _, locs in native.publishers["pod-a"].engine.holdings().values() for loc in locs}
    assert locations == {location_of(m) for m in media}
    assert [location_of(m) for m in ("cuda:0", "CUDA:12", "cpu:1", "cuda:", "cuda:x", "cuda:0:1", "cuda:١")] == [
        "GPU", "GPU", "LocalCPUBackend", "cuda:", "cuda:x", "cuda:0:1", "cuda:١"]


def test_bad_payloads_change_nothing():
    good = msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
                                          "token_ids": list(range(8)), "block_size": 4}], 0])
    src = source(True)
    before = state(src)
    for end in range(len(good)):
        assert parse_kv_batch(good[:end]) is None
        src.receive(0, src.subscriptions[0], TOPICS[0], 0, good[:end])
    huge = b"\x93\xcb" + bytes(8) + b"\xdd\xff\xff\xff\xff" + b"\xce" * (100 << 20)
    assert parse_kv_batch(huge) is None
    src.receive(0, src.subscriptions[0], TOPICS[0], 0, huge)
    after = state(src)
    after.pop("counts"), before.pop("counts")  # decode errors are counted
    assert after == before
    assert src.counts.get("decode_errors", 0) >= 1


@pytest.mark.parametrize("seed", range(3))
def test_garbage_never_crashes_the_parser(seed):
    import random

    rnd = random.Random(seed)
    good = msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
                                          "token_ids": list(range(8)), "block_size": 4, "medium": "GPU"},
                                         {"type": "BlockRemoved", "block_hashes": [b"\x01" * 32]}], 0])
    taken = []
    for _ in range(5000):
        buf = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        if parse_kv_batch(bytes(buf)) is not None:
            taken.append(bytes(buf))
    for _ in range(2000):
        parse_kv_batch(rnd.randbytes(rnd.randint(0, 64)))
    # whatever mutated payload the parser takes, the Python decoder reads to the same state
    # (a mutated name, type or attention kind that is not valid UTF-8 is refused by both)
    assert len(taken) > 100
    stream = [(b"kv@pod-0@m", payload) for payload in taken]
    native, python = source(True), source(False)
    feed(native, stream)
    feed(python, stream)
    assert state(native) == state(python)


class _Done(Exception):
    pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.integers(0, 3))
def test_bursts_of_queued_messages_end_as_one_at_a_time(stream, jumps):
    """The live loop applies what is queued in bursts, with the index writes at the end of
    each: the same state as applying message by message (gaps and restarts included)."""
    burst, one_by_one = bursts_and_one_at_a_time(stream, jumps)
    assert burst == one_by_one


class _FailingJoin:
    @staticmethod
    def join(ops):
        raise RuntimeError("a join that fails")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_bursts_lose_nothing_when_the_join_fails_or_messages_are_read_whole(stream):
    """Two fallbacks of the live loop: a burst's joined write that fails (a bug) is queued
    engine by engine instead, and a reader that takes whole messages (pyzmq without the frame
    flag) reads the same messages: the state is that of message by message either way."""
    read_by_frame = burst_reader.BurstReader.__init__

    def whole_messages(self, *args):
        read_by_frame(self, *args)
        self.by_frame = False

    saved = kv_event_source.EngineOps
    kv_event_source.EngineOps, burst_reader.BurstReader.__init__ = _FailingJoin, whole_messages
    try:
        burst, one_by_one = bursts_and_one_at_a_time(stream, 0)
    finally:
        kv_event_source.EngineOps, burst_reader.BurstReader.__init__ = saved, read_by_frame
    assert burst == one_by_one


def bursts_and_one_at_a_time(stream, jumps) -> tuple[dict, dict]:
    """The stream through the live loop (bursts read from a real socket) and message by
    message: both sources' states."""
    messages, seqs = [], {}
    for i, (topic, payload) in enumerate(stream):
        seq = seqs.get(topic, 0)
        if jumps and i % 4 == jumps:
            seq = max(0, seq + (2 if i % 2 else -2))  # a gap (lost messages) or a restart
        seqs[topic] = seq + 1
        messages.append([topic, seq.to_bytes(8, "big"), payload])
    one_by_one = source(True)
    for topic, seq, payload in messages:
        one_by_one.receive(0, one_by_one.subscriptions[0], topic, int.from_bytes(seq, "big"), payload)
    burst = source(True)
    end = b"end-of-test"
    live_message = burst._live_message

    def until_end(position, sub, frames):
        if frames[0] == end:
            raise _Done
        live_message(position, sub, frames)

    burst._live_message = until_end

    async def run() -> None:
        # the messages wait in a real socket's queue: the loop reads them in bursts, its index
        # writes going behind it (the write-behind thread) while it reads on
        ctx = zmq.asyncio.Context()
        try:
            pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
            for sock in (pull, push):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 0)
                sock.setsockopt(zmq.RCVHWM, 0)
            pull.bind("inproc://bursts")
            push.connect("inproc://bursts")
            for frames in messages + [[end, bytes(8), b""]]:
                await push.send_multipart(frames)
            burst.subscriptions[0].sub = pull
            with pytest.raises(_Done):
                await burst._live_loop(0, burst.subscriptions[0])
            burst.settle()  # the loop settles before it awaits; this one ended mid-burst
        finally:
            ctx.destroy(linger=0)

    # short bursts and few of them between the loop's turns, so a stream here spans several
    saved = kv_event_source.LIVE_BURST, burst_reader.ROUNDS_BEHIND
    kv_event_source.LIVE_BURST, burst_reader.ROUNDS_BEHIND = 3, 2
    try:
        asyncio.run(run())
    finally:
        kv_event_source.LIVE_BURST, burst_reader.ROUNDS_BEHIND = saved
    return state(burst), state(one_by_one)


class RecordingIndex:
    """Any object with ``apply_batch``: forwards to an Index and keeps what it was given."""

    def __init__(self, inner: Index):
        self.inner = inner
        self.batches: list[list[tuple]] = []

    def apply_batch(self, events):
        events = list(events)
        self.batches.append(events)
        return self.inner.apply_batch(events)


def test_engine_ops_apply_to_an_index_or_anything_with_apply_batch():
    """The operations a map queues give the same index whether applied natively to an Index or
    handed in apply_batch's form to a wrapper (an index that records what it applies)."""
    m = EngineMap("pod-a", 0, {})
    m.store([11, 12, 13], None, list(range(12)), 4, "GPU", 0, 3)
    m.store([21], 12, list(range(100, 104)), 4, "GPU", None, 1)
    m.tier_update([11, 12], "cpu")
    m.remove([13], "GPU")
    (number, ops), = m.take_pending()
    direct, wrapped = Index(4), Index(4)
    for index in (direct, wrapped):
        index.register_worker("pod-a", 0)
    recorder = RecordingIndex(wrapped)
    assert ops.apply_to(direct) == ops.apply_to(recorder)
    assert recorder.batches == [ops.as_tuples()]
    assert sorted(direct.holder_counts()) == sorted(wrapped.holder_counts()) != []
    prompt = list(range(8)) + list(range(100, 104))
    assert direct.lookup(prompt) == wrapped.lookup(prompt) and direct.lookup(prompt)
