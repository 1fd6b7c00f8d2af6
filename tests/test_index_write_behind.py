"""Writes applied behind the caller (``Index.start_write_behind`` / ``apply_batch_later``):
whatever mix of queued and immediate writes a caller makes, the index ends exactly as if every
write had been applied at once in the same order, the counts add up the same, a reader on
another thread sees each queued batch whole, and bad input is refused when queued."""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_rs import EngineMap, EngineOps, Index, InvalidArgumentError, InvalidTypeError, chunk_hashes
from lmcache_rs.controller.kv_events import EventDecoder

CHUNK = 4
PROMPTS = [[(i * (b + 3)) % 17 for i in range(48)] for b in range(3)]
KEYS = [chunk_hashes(p, CHUNK) for p in PROMPTS]


def keys_of(prompt: int, n: int) -> list[int]:
    return KEYS[prompt][:n]


holders = st.tuples(st.sampled_from(["A", "B"]), st.integers(0, 1), st.sampled_from(["GPU", "LocalCPUBackend"]))
batch_events = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["admit", "admit", "evict"]), holders, st.integers(0, 2), st.integers(1, 12)),
        st.tuples(st.just("drop"), holders, st.just(0), st.just(0)),
    ),
    min_size=1, max_size=4)
writes = st.lists(
    st.one_of(
        st.tuples(st.just("later"), batch_events),
        st.tuples(st.just("batch"), batch_events),
        st.tuples(st.just("register"), holders),
        st.tuples(st.just("remove_worker"), holders),
        st.tuples(st.just("clear"), holders),
        st.tuples(st.just("settle"), st.just(None)),
    ),
    max_size=40)


def as_events(spec: list) -> list[tuple]:
    out = []
    for op, (inst, worker, loc), prompt, n in spec:
        if op == "drop":
            out.append(("drop", inst, worker, loc, b""))
        else:
            out.append((op, inst, worker, loc, keys_of(prompt, n)))
    return out


def state(ix: Index) -> tuple:
    return (ix.digest(), sorted(ix.holder_counts()), sorted((k, sorted(v)) for k, v in ix.workers().items()),
            [sorted(ix.lookup(p).items()) for p in PROMPTS])


def apply(ix: Index, write: tuple, behind: bool) -> tuple[int, int]:
    """One write; returns what it counted now (queued batches count at ``settle``)."""
    kind, arg = write
    if kind == "later" and behind:
        ix.apply_batch_later(as_events(arg))
        return (0, 0)
    if kind in ("later", "batch"):
        return ix.apply_batch(as_events(arg))
    if kind == "settle":
        return ix.settle()
    inst, worker, loc = arg
    if kind == "register":
        ix.register_worker(inst, worker)
        return (0, 0)
    if kind == "remove_worker":
        return (0, ix.remove_worker(inst, worker))
    return (0, ix.clear(inst, loc))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writes)
def test_queued_and_immediate_writes_end_as_the_same_writes_applied_at_once(ws):
    behind, at_once = Index(CHUNK), Index(CHUNK)
    behind.start_write_behind()
    got, want = [0, 0], [0, 0]
    for w in ws:
        for total, ix, b in ((got, behind, True), (want, at_once, False)):
            a, e = apply(ix, w, b)
            total[0] += a
            total[1] += e
    a, e = behind.settle()
    assert (got[0] + a, got[1] + e) == tuple(want)
    assert state(behind) == state(at_once)
    behind.check_invariants()


def test_a_reader_sees_each_queued_batch_whole():
    """Each queued batch moves a prompt from one instance to the other (admits it for one,
    evicts it for the other): a reader on another thread, whose every lookup reads one
    published state, sees exactly one instance holding the whole prompt, never part of it,
    both or neither; and after settle the last batch's state is there."""
    ix = Index(CHUNK)
    ix.start_write_behind()
    prompt, keys = PROMPTS[0], KEYS[0]
    ix.apply_batch([("admit", "A", 0, "GPU", keys)])
    whole = {"A": ("GPU", len(prompt))}, {"B": ("GPU", len(prompt))}
    seen: list[dict] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            got = ix.lookup(prompt)
            if got not in whole:
                seen.append(got)
                return
            if not seen:
                seen.append(got)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(2000):
            to, away = ("B", "A") if n % 2 == 0 else ("A", "B")
            ix.apply_batch_later([("admit", to, 0, "GPU", keys), ("evict", away, 0, "GPU", keys)])
    finally:
        ix.settle()
        stop.set()
        reader.join()
    assert seen and all(got in whole for got in seen), f"a reader saw part of a batch: {seen}"
    assert ix.lookup(prompt) == whole[0]  # 2000 moves: back with A


def test_bad_batches_are_refused_when_queued_and_nothing_is_applied():
    ix = Index(CHUNK)
    with pytest.raises(InvalidArgumentError, match="start_write_behind"):
        ix.apply_batch_later([("admit", "A", 0, "GPU", KEYS[0])])
    ix.start_write_behind()
    ix.start_write_behind()  # a second start does nothing
    assert ix.writes_behind
    with pytest.raises(InvalidArgumentError, match="unknown op"):
        ix.apply_batch_later([("admit", "A", 0, "GPU", KEYS[0]), ("bogus", "A", 0, "GPU", [])])
    with pytest.raises(InvalidTypeError):
        ix.apply_batch_later([("admit", "A", 0, "GPU", "not keys")])
    with pytest.raises(InvalidTypeError):
        ix.apply_batch_later([("admit", "A", 0, "GPU", KEYS[0])], extra=1)
    assert ix.settle() == (0, 0)
    assert len(ix) == 0
    ix.check_invariants()


def test_engine_ops_queue_only_for_an_index():
    decoded = EventDecoder().decode(_one_store())
    m = EngineMap("pod", 0, {})
    m.set_root_namespace(16, 0)
    m.apply_parsed(decoded.parsed)
    (_, ops), = m.take_pending()
    ix = Index(16)
    ix.start_write_behind()
    with pytest.raises(InvalidTypeError, match="apply_later"):
        ops.apply_later(object())
    ops.apply_later(ix)
    assert ix.settle() == (1, 0)
    assert len(ix) == 1


def _one_store() -> bytes:
    import msgspec
    block = {"type": "BlockStored", "block_hashes": [7], "parent_block_hash": None, "token_ids": list(range(16)),
             "block_size": 16, "lora_id": None, "medium": "GPU"}
    return msgspec.msgpack.encode([0.0, [block], 0])


def test_dump_holds_every_write_queued_before_it(tmp_path):
    ix = Index(CHUNK)
    ix.start_write_behind()
    for p in range(3):
        ix.apply_batch_later([("admit", "A", 0, "GPU", KEYS[p])])
    ix.dump(tmp_path / "snap")
    loaded = Index(CHUNK)
    loaded.load(tmp_path / "snap")
    assert state(loaded) == state(ix)
    assert len(loaded) == len({k for ks in KEYS for k in ks})  # every queued admit


engine_steps = st.lists(
    st.tuples(st.integers(0, 2),  # engine
              st.sampled_from(["store", "store", "remove", "clear"]),
              st.integers(0, 2),  # prompt
              st.integers(1, 12),  # blocks
              st.sampled_from(["GPU", "LocalCPUBackend"])),
    min_size=1, max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(engine_steps, st.integers(1, 4))
def test_engine_ops_joined_do_what_they_do_one_after_another(steps, rounds):
    """Several engines' operations on one namespace, joined into one write (as the KV-event live
    loop queues a burst), leave the index as applying each engine's in turn."""
    engines = [EngineMap(f"pod-{e}", 0, {}) for e in range(3)]
    one_by_one, joined = Index(CHUNK), Index(CHUNK)
    joined.start_write_behind()
    for part in range(rounds):  # several bursts, each joined on its own
        burst = []
        for e, what, prompt, n, loc in steps[part::rounds]:
            hashes = [(prompt << 8) | i for i in range(n)]
            if what == "store":
                engines[e].store(hashes, None, PROMPTS[prompt][:n * CHUNK], CHUNK, loc, 0, n)
            elif what == "remove":
                engines[e].remove(hashes[n // 2:], loc)
            else:
                engines[e].clear()
            burst.extend(ops for _, ops in engines[e].take_pending())
        for ops in burst:
            ops.apply_to(one_by_one)
        if burst:
            EngineOps.join(burst).apply_later(joined)
    joined.settle()
    assert state(joined) == state(one_by_one)
    assert len(EngineOps.join([])) == 0
