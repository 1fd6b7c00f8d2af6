"""Index.digest(): equal to a plain-Python digest of the reference model after any sequence of
operations, and independent of the order that produced the same holdings."""

from __future__ import annotations

import random

import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_rs import Index
from reference_model import ReferenceIndex

MASK = (1 << 64) - 1


def reference_digest(ref: ReferenceIndex) -> int:
    total = 0
    for key, holders in ref.holdings.items():
        for instance, worker, location in holders:
            data = (b"h" + key.to_bytes(8, "little") + worker.to_bytes(4, "little") + instance.encode() + b"\0"
                    + location.encode())
            total += xxhash.xxh3_64_intdigest(data)
    for instance, workers in ref.workers.items():
        for worker in workers:
            total += xxhash.xxh3_64_intdigest(b"w" + worker.to_bytes(4, "little") + instance.encode())
    return total & MASK


INSTANCES = ["a", "b", "inst-ü"]
LOCATIONS = ["LocalCPUBackend", "LocalDiskBackend"]
op = st.one_of(
    st.tuples(st.sampled_from(["admit", "evict"]), st.sampled_from(INSTANCES), st.integers(0, 2),
              st.sampled_from(LOCATIONS), st.lists(st.integers(0, 2**64 - 1) | st.integers(1, 40), max_size=8)),
    st.tuples(st.just("drop"), st.sampled_from(INSTANCES), st.integers(0, 2),
              st.sampled_from([None, *LOCATIONS]), st.just([])),
    st.tuples(st.sampled_from(["register", "remove"]), st.sampled_from(INSTANCES), st.integers(0, 2),
              st.none(), st.none()),
)


def apply(ix: Index, ref: ReferenceIndex, ops: list) -> None:
    for kind, instance, worker, location, keys in ops:
        if kind == "register":
            ix.register_worker(instance, worker)
            ref.register_worker(instance, worker)
        elif kind == "remove":
            ix.remove_worker(instance, worker)
            ref.remove_worker(instance, worker)
        elif kind == "drop":
            ix.apply_batch([("drop", instance, worker, location, b"")])
            ref._drop(lambda h: h[0] == instance and h[1] == worker and (location is None or h[2] == location))
        else:
            ix.apply_batch([(kind, instance, worker, location, keys)])
            if kind == "admit":
                ref.admit(instance, worker, location, keys)
            else:
                ref.evict(instance, worker, location, keys)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=40))
def test_digest_equals_reference(ops: list) -> None:
    ix, ref = Index(chunk_size=4), ReferenceIndex(4)
    apply(ix, ref, ops)
    assert ix.digest() == reference_digest(ref)


def test_digest_ignores_order_and_history() -> None:
    rng = random.Random(5)
    keys = [rng.getrandbits(64) for _ in range(2000)]
    one, two = Index(chunk_size=16), Index(chunk_size=16)
    one.apply_batch([("admit", "a", 0, "cpu", keys), ("admit", "b", 1, "disk", keys[:500])])
    two.apply_batch([("admit", "b", 1, "disk", keys[:500][::-1]), ("admit", "c", 0, "cpu", keys[:10])])
    two.remove_worker("c", 0)
    two.apply_batch([("admit", "a", 0, "cpu", keys[::-1])])
    assert one.digest() == two.digest() != 0
    two.apply_batch([("evict", "a", 0, "cpu", keys[:1])])
    assert one.digest() != two.digest()
    assert Index(chunk_size=16).digest() == 0
