"""lmcache_rs.Index: the API contract of _core.pyi on hand-made cases, checked against the
reference model where it applies."""

from __future__ import annotations

import json

import pytest

from lmcache_rs import Index, InvalidArgumentError, InvalidTypeError, LMCacheError, chunk_hashes
from reference_model import ReferenceIndex

CPU, GPU, DISK = "LocalCPUBackend", "GPU", "LocalDiskBackend"


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_spec_example() -> None:
    ix = Index()
    tokens = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
    assert ix.admit("lmcache_default_instance", 0, CPU, tokens=tokens) == 1
    assert ix.lookup(tokens) == {"lmcache_default_instance": (CPU, 12)}
    body = json.dumps({"tokens": tokens}).encode()
    out = json.loads(ix.lookup_json(body, "ev-1"))
    assert out == {
        "event_id": "ev-1",
        "layout_info": {"lmcache_default_instance": [CPU, 12]},
        "lmcache_default_instance": [CPU, 12],
    }
    assert json.loads(ix.lookup_json(b'{"tokens": [1, 2]}', "x")) == {"event_id": "x", "layout_info": {}}


def test_all_workers_must_hold() -> None:
    ix = Index(chunk_size=4)
    ix.register_worker("A", 0)
    ix.register_worker("A", 1)
    ix.admit("A", 0, CPU, tokens=toks(12))
    assert ix.lookup(toks(12)) == {}
    ix.admit("A", 1, CPU, tokens=toks(8))
    assert ix.lookup(toks(12)) == {"A": (CPU, 8)}
    # a new worker joining makes the instance lose its matches until it holds them too
    ix.register_worker("A", 2)
    assert ix.lookup(toks(12)) == {}
    assert ix.remove_worker("A", 2) == 0
    assert ix.lookup(toks(12)) == {"A": (CPU, 8)}
    # removing a worker drops its holdings and the others then suffice
    assert ix.remove_worker("A", 1) == 2
    assert ix.lookup(toks(12)) == {"A": (CPU, 12)}
    assert ix.workers() == {"A": [0]}
    ix.check_invariants()


def test_best_location_and_tie_order() -> None:
    ix = Index(chunk_size=4)
    ix.admit("A", 0, DISK, tokens=toks(8))
    ix.admit("A", 0, "remote", tokens=toks(8))
    assert ix.lookup(toks(8)) == {"A": (DISK, 8)}
    ix.admit("A", 0, CPU, tokens=toks(8))
    assert ix.lookup(toks(8)) == {"A": (CPU, 8)}
    ix.admit("A", 0, GPU, tokens=toks(8))
    assert ix.lookup(toks(8)) == {"A": (GPU, 8)}
    # longer wins over faster
    ix.admit("A", 0, "remote", tokens=toks(12))
    assert ix.lookup(toks(12)) == {"A": ("remote", 12)}
    # remote tiers tie by name
    ix.admit("A", 0, "aaa", tokens=toks(12))
    assert ix.lookup(toks(12)) == {"A": ("aaa", 12)}
    ix.check_invariants()


def test_partial_chunk_and_prefix_semantics() -> None:
    ix = Index(chunk_size=4)
    ix.admit("A", 0, CPU, tokens=toks(10))  # chunks of 4, 4, 2
    assert ix.lookup(toks(10)) == {"A": (CPU, 10)}
    assert ix.lookup(toks(9)) == {"A": (CPU, 8)}  # last partial chunk differs
    assert ix.lookup(toks(12)) == {"A": (CPU, 8)}
    assert ix.lookup(toks(3)) == {}
    assert ix.lookup([]) == {}
    # a hole in the middle ends the prefix
    keys = chunk_hashes(toks(10), 4)
    assert ix.evict("A", 0, CPU, hashes=[keys[1]]) == 1
    assert ix.lookup(toks(10)) == {"A": (CPU, 4)}
    assert ix.evict("A", 0, CPU, hashes=[keys[1]]) == 0
    assert ix.evict("B", 0, CPU, hashes=keys) == 0
    ix.check_invariants()


def test_counts_and_stats() -> None:
    ix = Index(chunk_size=4)
    assert ix.admit("A", 0, CPU, tokens=toks(16)) == 4
    assert ix.admit("A", 0, CPU, tokens=toks(16)) == 0
    assert ix.admit("A", 1, CPU, tokens=toks(8)) == 2
    assert ix.admit("B", 0, GPU, tokens=toks(4)) == 1
    s = ix.stats()
    assert s["chunks"] == s["nodes"] == len(ix) == 4
    assert s["holdings"] == 7
    assert s["holders"] == 3
    assert s["instances"] == 2
    assert s["workers"] == 3
    assert s["holder_sets"] == 3  # {A0}, {A0, A1}, {A0, A1, B0}
    assert s["bytes"] > 0
    assert sorted(ix.holder_counts()) == [("A", 0, CPU, 4), ("A", 1, CPU, 2), ("B", 0, GPU, 1)]
    assert ix.clear("A", CPU) == 6
    assert ix.clear("A") == 0
    assert ix.holder_counts() == [("B", 0, GPU, 1)]
    assert ix.workers() == {"A": [0, 1], "B": [0]}
    assert ix.clear("B") == 1
    assert len(ix) == 0
    ix.check_invariants()


def test_apply_batch_is_atomic_and_validated() -> None:
    ix = Index(chunk_size=4)
    k = chunk_hashes(toks(12), 4)
    assert ix.apply_batch([("admit", "A", 0, CPU, k), ("admit", "A", 1, CPU, k[:2]), ("evict", "A", 0, CPU, k[2:])]) == (
        5,
        1,
    )
    assert ix.lookup(toks(12)) == {"A": (CPU, 8)}
    before = (ix.stats(), ix.holder_counts())
    bad_batches = [
        [("admit", "A", 0, CPU, k), ("frobnicate", "A", 0, CPU, k)],
        [("admit", "A", 0, CPU, k), ("admit", "A", -1, CPU, k)],
        [("admit", "A", 0, CPU, k), ("admit", "event_id", 0, CPU, k)],
        [("admit", "A", 0, CPU, k), ("admit", "A", 0, CPU, [-(2**63) - 1])],
        [("admit", "A", 0, CPU, k), ("admit", "A", 0, CPU)],
        [("admit", "A", 0, CPU, k), ["admit", "A", 0, CPU, k]],
        [("admit", "A", 0, 7, k)],
    ]
    for batch in bad_batches:
        with pytest.raises(LMCacheError, match=r"events\[|events"):
            ix.apply_batch(batch)  # type: ignore[arg-type]
        assert (ix.stats(), ix.holder_counts()) == before
    with pytest.raises(InvalidTypeError):
        ix.apply_batch(5)  # type: ignore[arg-type]
    assert ix.apply_batch([]) == (0, 0)
    ix.check_invariants()


def test_apply_batch_drop_replaces_holdings_atomically() -> None:
    ix = Index(chunk_size=4)
    ix.admit("A", 0, CPU, tokens=toks(12))
    ix.admit("A", 0, GPU, tokens=toks(8))
    ix.admit("A", 1, CPU, tokens=toks(12))
    # a full resync of worker 0: drop everything it holds, then admit what it reports now
    assert ix.apply_batch([("drop", "A", 0, None, None), ("admit", "A", 0, CPU, chunk_hashes(toks(4), 4))]) == (1, 5)
    assert ix.workers() == {"A": [0, 1]}
    assert ix.lookup(toks(12)) == {"A": (CPU, 4)}
    assert ix.apply_batch([("drop", "A", 1, CPU, b"")]) == (0, 3)
    assert ix.apply_batch([("drop", "A", 1, GPU, b""), ("drop", "Z", 0, None, b"")]) == (0, 0)
    assert ix.holder_counts() == [("A", 0, CPU, 1)]
    with pytest.raises(InvalidTypeError, match=r"events\[0\].*location"):
        ix.apply_batch([("drop", "A", 0, 5, b"")])
    ix.check_invariants()


def test_reserved_instance_ids() -> None:
    ix = Index()
    for name in ("event_id", "layout_info", "detail"):
        with pytest.raises(InvalidArgumentError, match="reserved"):
            ix.admit(name, 0, CPU, tokens=[1])
        with pytest.raises(InvalidArgumentError, match="reserved"):
            ix.register_worker(name, 0)
    assert ix.workers() == {}


def test_lookup_detailed() -> None:
    ix = Index(chunk_size=4)
    ix.register_worker("A", 1)
    ix.admit("A", 0, CPU, tokens=toks(12))
    ix.admit("A", 1, CPU, tokens=toks(4))
    ix.admit("A", 1, GPU, tokens=toks(8))
    ix.admit("B", 0, DISK, tokens=toks(4))
    ix.register_worker("C", 0)
    d = ix.lookup_detailed(toks(12))
    assert d == {
        "A": {
            "location": CPU,
            "matched_prefix_length": 4,
            "locations": {CPU: 4, GPU: 0},
            "workers": {0: {CPU: 12}, 1: {CPU: 4, GPU: 8}},
        },
        "B": {
            "location": DISK,
            "matched_prefix_length": 4,
            "locations": {DISK: 4},
            "workers": {0: {DISK: 4}},
        },
    }
    ix.evict("A", 1, CPU, tokens=toks(4))
    d = ix.lookup_detailed(toks(12))
    assert d["A"]["location"] is None and d["A"]["matched_prefix_length"] == 0
    assert ix.lookup(toks(12)) == {"B": (DISK, 4)}
    out = json.loads(ix.lookup_json(json.dumps({"tokens": toks(12)}).encode(), "e", detail=True))
    assert out["detail"]["A"]["workers"] == {"0": {CPU: 12}, "1": {GPU: 8}}
    assert out["layout_info"] == {"B": [DISK, 4]}


def test_lookup_json_errors_and_escaping() -> None:
    ix = Index(chunk_size=4)
    ix.admit('we"ird\ninst\u00e9', 0, 'loc"\\', tokens=toks(4))
    out = json.loads(ix.lookup_json(b'{"tokens": [0, 1, 2, 3], "model": "x", "extra": {"a": [1]}}', 'e"1'))
    assert out == {
        "event_id": 'e"1',
        "layout_info": {'we"ird\ninst\u00e9': ['loc"\\', 4]},
        'we"ird\ninst\u00e9': ['loc"\\', 4],
    }
    assert json.loads(ix.lookup_json(bytearray(b'{"tokens": [0]}'), "e")) == {"event_id": "e", "layout_info": {}}
    for body, msg in [
        (b"", "body"),
        (b"not json", "body"),
        (b"[1, 2]", "object"),
        (b"{}", "tokens"),
        (b'{"tokens": 5}', "tokens"),
        (b'{"tokens": [1, -1]}', r"tokens\[1\]"),
        (b'{"tokens": [4294967296]}', r"tokens\[0\]"),
        (b'{"tokens": [1.0]}', r"tokens\[0\]"),
        (b'{"tokens": ["1"]}', r"tokens\[0\]"),
        (b'{"tokens": [1]} trailing', "body"),
    ]:
        with pytest.raises(InvalidArgumentError, match=msg):
            ix.lookup_json(body, "e")
    with pytest.raises(InvalidTypeError):
        ix.lookup_json("str body", "e")  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError):
        ix.lookup_json(b"{}", 5)  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match="unexpected keyword"):
        ix.lookup_json(b"{}", "e", details=True)  # type: ignore[call-arg]


def test_against_reference_small() -> None:
    ix, ref = Index(chunk_size=3), ReferenceIndex(chunk_size=3)
    ops = [
        ("admit", "A", 0, CPU, toks(9)),
        ("admit", "A", 1, CPU, toks(6)),
        ("admit", "B", 0, GPU, toks(5)),
        ("admit", "B", 0, CPU, toks(9)),
        ("evict", "B", 0, GPU, toks(3)),
    ]
    for op, inst, w, loc, t in ops:
        got = getattr(ix, op)(inst, w, loc, tokens=t)
        want = getattr(ref, op)(inst, w, loc, chunk_hashes(t, 3))
        assert got == want
        for n in range(11):
            assert ix.lookup(toks(n)) == ref.lookup(toks(n))
    ix.check_invariants()


def test_properties_and_repr() -> None:
    ix = Index(chunk_size=16, seed=5)
    assert ix.chunk_size == 16 and ix.seed == 5
    assert "chunk_size=16" in repr(ix)
    with pytest.raises(InvalidArgumentError):
        Index(chunk_size=0)
    with pytest.raises(InvalidArgumentError):
        Index(seed=-1)
    with pytest.raises(InvalidTypeError):
        Index(chunk_size="8")  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match="unexpected keyword"):
        Index(chunksize=8)  # type: ignore[call-arg]


def test_remove_unknown_and_clear_unknown() -> None:
    ix = Index()
    assert ix.remove_worker("nope", 0) == 0
    assert ix.clear("nope") == 0
    assert ix.clear("nope", "GPU") == 0
    ix.admit("A", 0, CPU, tokens=[1])
    assert ix.clear("A", "GPU") == 0
    assert ix.remove_worker("A", 7) == 0
    assert ix.workers() == {"A": [0]}
    assert ix.remove_worker("A", 0) == 1
    assert ix.workers() == {}
    ix.check_invariants()


def test_large_index_resizes_incrementally_with_right_answers() -> None:
    # Large tables resize a little at every write (rust/table.rs, Drain): grow through several
    # resizes, then shrink through several, checking both copies' structure and membership
    # answers against a dict at points that fall inside resizes as well as between them.
    import random

    rng = random.Random(5)
    ix = Index(chunk_size=16)
    held: dict[int, set[str]] = {}
    keys = list({rng.getrandbits(64) | 1 for _ in range(150_000)})

    def check() -> None:
        ix.check_invariants()
        assert len(ix) == len(held)
        for k in rng.sample(keys, 1_500):
            want = {inst: (CPU, 1) for inst in held.get(k, ())}
            assert ix.lookup_keys([k]) == want

    for start in range(0, len(keys), 5_000):
        batch = keys[start:start + 5_000]
        inst = "A" if start % 10_000 == 0 else "B"
        ix.admit(inst, 0, CPU, hashes=batch)
        for k in batch:
            held.setdefault(k, set()).add(inst)
        gone = rng.sample(batch, 1_000)
        ix.evict(inst, 0, CPU, hashes=gone)
        for k in gone:
            held[k].discard(inst)
            if not held[k]:
                del held[k]
        if start % 20_000 == 0:
            check()
    check()
    for start in range(0, len(keys), 7_000):
        batch = keys[start:start + 7_000]
        for inst in ("A", "B"):
            ix.evict(inst, 0, CPU, hashes=batch)
        for k in batch:
            held.pop(k, None)
        check()
    assert len(ix) == 0
