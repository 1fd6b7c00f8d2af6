"""Every accepted way to pass tokens and chunk keys, and every bad input: bad input raises
InvalidTypeError / InvalidArgumentError naming the problem and leaves the index unchanged."""

from __future__ import annotations

import array
import platform
import sys
import sysconfig
from typing import Any, Callable

import numpy as np
import pytest

try:  # the index does not need torch; its tensors are one more input kind when present
    import torch
except ImportError:
    torch = None

from lmcache_rs import Index, InvalidArgumentError, InvalidTypeError, __version__, chunk_hashes, runtime_info

CPU = "LocalCPUBackend"
TOKENS = [(i * 7919) % 50_000 for i in range(40)] + [2**32 - 1]
CHUNK = 8


def fresh() -> Index:
    ix = Index(chunk_size=CHUNK)
    ix.admit("A", 0, CPU, tokens=TOKENS)
    return ix


def snapshot(ix: Index) -> Any:
    return (ix.stats(), ix.holder_counts(), ix.workers(), ix.lookup(TOKENS))


GOOD_TOKENS: dict[str, Callable[[], Any]] = {
    "list": lambda: list(TOKENS),
    "tuple": lambda: tuple(TOKENS),
    "deque": lambda: __import__("collections").deque(TOKENS),
    "array I": lambda: array.array("I", TOKENS),
    "array L": lambda: array.array("L", TOKENS),
    "array Q": lambda: array.array("Q", TOKENS),
    "array q": lambda: array.array("q", TOKENS),
    "bytes": lambda: array.array("I", TOKENS).tobytes(),
    "bytearray": lambda: bytearray(array.array("I", TOKENS).tobytes()),
    "memoryview bytes": lambda: memoryview(array.array("I", TOKENS).tobytes()),
    "memoryview I": lambda: memoryview(array.array("I", TOKENS)),
    "numpy int32": lambda: np.array([t if t < 2**31 else 0 for t in TOKENS], dtype=np.int32),
    "numpy int64": lambda: np.array(TOKENS, dtype=np.int64),
    "numpy uint32": lambda: np.array(TOKENS, dtype=np.uint32),
    "numpy uint64": lambda: np.array(TOKENS, dtype=np.uint64),
    "numpy strided": lambda: np.array([x for t in TOKENS for x in (t, 99)], dtype=np.int64)[::2],
    "numpy little-endian explicit": lambda: np.array(TOKENS, dtype="<u4"),
    "numpy int scalars in a list": lambda: [np.int64(t) for t in TOKENS],
}
if torch is not None:
    GOOD_TOKENS.update({
        "torch int64": lambda: torch.tensor(TOKENS, dtype=torch.int64),
        "torch int32": lambda: torch.tensor([t if t < 2**31 else 0 for t in TOKENS], dtype=torch.int32),
        "torch slice": lambda: torch.tensor([x for t in TOKENS for x in (t, 99)], dtype=torch.int64)[::2],
    })


def expected(name: str) -> list[int]:
    return [t if t < 2**31 else 0 for t in TOKENS] if name in ("numpy int32", "torch int32") else TOKENS


@pytest.mark.parametrize("name", sorted(GOOD_TOKENS))
def test_accepted_token_types(name: str) -> None:
    ix = fresh()
    want = expected(name)
    assert chunk_hashes(GOOD_TOKENS[name](), CHUNK) == chunk_hashes(want, CHUNK)
    assert ix.lookup(GOOD_TOKENS[name]()) == ix.lookup(want)
    ix2 = Index(chunk_size=CHUNK)
    assert ix2.admit("A", 0, CPU, tokens=GOOD_TOKENS[name]()) == len(chunk_hashes(want, CHUNK))
    assert ix2.lookup(want) == {"A": (CPU, len(want))}
    assert ix2.evict("A", 0, CPU, tokens=GOOD_TOKENS[name]()) == len(chunk_hashes(want, CHUNK))
    ix2.check_invariants()


def test_lists_of_int_take_the_direct_read_on_cpython_3_10_to_3_14() -> None:
    # The direct read of int objects is declined (everything then goes through the C API) when
    # its self-check at first use disagrees with the interpreter; on the CPythons it is written
    # for, that would be a layout it misreads, so it must be on there.
    info = runtime_info()
    assert info["version"] == __version__
    supported = (platform.python_implementation() == "CPython" and (3, 10) <= sys.version_info[:2] <= (3, 14)
                 and sys.int_info.bits_per_digit == 30 and not sysconfig.get_config_var("Py_GIL_DISABLED"))
    assert info["fast_int_lists"] is supported
    # every digit-count boundary, read directly and through the general path (an int subclass)
    values = [v for e in (0, 1, 29, 30, 31, 32) for v in (2**e - 1, 2**e, 2**e + 1) if v < 2**32]
    assert chunk_hashes(values, 4) == chunk_hashes([_IntSub(v) for v in values], 4)
    assert chunk_hashes(values, 4) == chunk_hashes(array.array("I", values), 4)


def test_range_tokens() -> None:
    assert chunk_hashes(range(100), CHUNK) == chunk_hashes(list(range(100)), CHUNK)


def test_accepted_hash_types() -> None:
    keys = chunk_hashes(TOKENS, CHUNK)
    for hashes in (
        keys,
        tuple(keys),
        array.array("Q", keys),
        array.array("Q", keys).tobytes(),
        memoryview(array.array("Q", keys).tobytes()),
        np.array(keys, dtype=np.uint64),
    ):
        ix = Index(chunk_size=CHUNK)
        assert ix.admit("A", 0, CPU, hashes=hashes) == len(keys)
        assert ix.lookup(TOKENS) == {"A": (CPU, len(TOKENS))}
    # small non-negative signed keys are fine too
    ix = Index(chunk_size=CHUNK)
    assert ix.admit("A", 0, CPU, hashes=np.array([0, 1, 2], dtype=np.int64)) == 3
    assert ix.admit("A", 0, CPU, hashes=[0, 2**64 - 1]) == 1


def test_buffer_is_read_in_place() -> None:
    # a writable numpy buffer changed after the call has no effect on what was stored
    arr = np.array(TOKENS, dtype=np.uint32)
    ix = Index(chunk_size=CHUNK)
    ix.admit("A", 0, CPU, tokens=arr)
    arr[:] = 0
    assert ix.lookup(TOKENS) == {"A": (CPU, len(TOKENS))}


BAD_TOKENS: list[tuple[str, Any, type, str]] = [
    ("negative int", [1, -1], InvalidArgumentError, r"tokens\[1\]"),
    ("too large int", [2**32], InvalidArgumentError, r"tokens\[0\]"),
    ("huge int", [2**70], InvalidArgumentError, r"tokens\[0\]"),
    ("float", [1.0], InvalidTypeError, r"tokens\[0\]"),
    ("str item", ["1"], InvalidTypeError, r"tokens\[0\]"),
    ("None item", [None], InvalidTypeError, r"tokens\[0\]"),
    ("str", "abc", InvalidTypeError, "str"),
    ("int", 5, InvalidTypeError, "tokens"),
    ("dict", {1: 2}, InvalidTypeError, "dict"),
    ("set", {1, 2}, InvalidTypeError, "set"),
    ("generator", (i for i in range(3)), InvalidTypeError, "generator"),
    ("numpy negative", np.array([1, -2], dtype=np.int64), InvalidArgumentError, r"tokens\[1\]"),
    ("numpy too large", np.array([2**33], dtype=np.int64), InvalidArgumentError, r"tokens\[0\]"),
    ("numpy uint64 too large", np.array([2**40], dtype=np.uint64), InvalidArgumentError, r"tokens\[0\]"),
    ("numpy float", np.array([1.0, 2.0]), InvalidTypeError, "format"),
    ("numpy bool", np.array([True]), InvalidTypeError, "format"),
    ("numpy 2-D", np.zeros((2, 2), dtype=np.int64), InvalidArgumentError, "one-dimensional"),
    ("numpy big-endian", np.array([1, 2], dtype=">u4"), InvalidTypeError, "big-endian"),
    ("array float", array.array("d", [1.0]), InvalidTypeError, "format"),
    ("array negative", array.array("i", [-1]), InvalidArgumentError, r"tokens\[0\]"),
    ("bytes not multiple of 4", b"\x01\x02\x03", InvalidArgumentError, "bytes"),
]
if torch is not None:
    BAD_TOKENS += [
        ("torch float", torch.tensor([1.0]), InvalidTypeError, "format"),
        ("torch negative", torch.tensor([-1]), InvalidArgumentError, r"tokens\[0\]"),
    ]


@pytest.mark.parametrize("case", BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS])
def test_bad_tokens(case: tuple[str, Any, type, str]) -> None:
    _, bad, exc, msg = case
    ix = fresh()
    before = snapshot(ix)
    for call in (
        lambda: ix.lookup(bad),
        lambda: ix.lookup_detailed(bad),
        lambda: ix.admit("A", 0, CPU, tokens=bad),
        lambda: ix.evict("A", 0, CPU, tokens=bad),
        lambda: chunk_hashes(bad),
    ):
        with pytest.raises(exc, match=msg):
            call()
        assert snapshot(ix) == before
    ix.check_invariants()


BAD_CALLS: list[tuple[str, Callable[[Index], Any], type, str]] = [
    ("both tokens and hashes", lambda ix: ix.admit("A", 0, CPU, tokens=[1], hashes=[1]), InvalidArgumentError, "not both"),
    ("neither tokens nor hashes", lambda ix: ix.admit("A", 0, CPU), InvalidArgumentError, "required"),
    ("evict neither", lambda ix: ix.evict("A", 0, CPU), InvalidArgumentError, "required"),
    ("unknown keyword", lambda ix: ix.admit("A", 0, CPU, tokens=[1], token=[1]), InvalidTypeError, "'token'"),
    ("unknown keyword lookup", lambda ix: ix.lookup(TOKENS, detail=True), InvalidTypeError, "'detail'"),
    ("negative worker", lambda ix: ix.admit("A", -1, CPU, tokens=[1]), InvalidArgumentError, "worker_id"),
    ("huge worker", lambda ix: ix.admit("A", 2**32, CPU, tokens=[1]), InvalidArgumentError, "worker_id"),
    ("str worker", lambda ix: ix.admit("A", "0", CPU, tokens=[1]), InvalidTypeError, "worker_id"),
    ("float worker", lambda ix: ix.register_worker("A", 1.0), InvalidTypeError, "worker_id"),
    ("int instance", lambda ix: ix.admit(5, 0, CPU, tokens=[1]), InvalidTypeError, "instance_id"),
    ("bytes location", lambda ix: ix.admit("A", 0, b"GPU", tokens=[1]), InvalidTypeError, "location"),
    ("reserved instance", lambda ix: ix.admit("layout_info", 0, CPU, tokens=[1]), InvalidArgumentError, "reserved"),
    # negative keys down to -2**63 are accepted (LMCache's signed builtin-hash keys)
    ("hash too negative", lambda ix: ix.admit("A", 0, CPU, hashes=[-(2**63) - 1]), InvalidArgumentError,
     r"hashes\[0\] = -9223372036854775809 is out of range -9223372036854775808\.\.=18446744073709551615"),
    ("hash too large", lambda ix: ix.admit("A", 0, CPU, hashes=[2**64]), InvalidArgumentError, r"hashes\[0\]"),
    ("hash bytes not multiple of 8", lambda ix: ix.admit("A", 0, CPU, hashes=b"\x00" * 12), InvalidArgumentError, "bytes"),
    ("float hashes", lambda ix: ix.admit("A", 0, CPU, hashes=np.array([1.5])), InvalidTypeError, "format"),
    ("clear bad location", lambda ix: ix.clear("A", 5), InvalidTypeError, "location"),
    ("remove bad worker", lambda ix: ix.remove_worker("A", -3), InvalidArgumentError, "worker_id"),
    ("dump bad path", lambda ix: ix.dump(5), InvalidTypeError, "path"),
    ("load bad path", lambda ix: ix.load(None), InvalidTypeError, "path"),
    ("lookup_json bad detail", lambda ix: ix.lookup_json(b"{}", "e", detail="yes"), InvalidTypeError, "detail"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_change_nothing(case: tuple[str, Callable[[Index], Any], type, str]) -> None:
    _, call, exc, msg = case
    ix = fresh()
    before = snapshot(ix)
    with pytest.raises(exc, match=msg):
        call(ix)
    assert snapshot(ix) == before
    ix.check_invariants()


def test_exception_hierarchy() -> None:
    from lmcache_rs import LMCacheError, SnapshotError

    assert issubclass(InvalidArgumentError, LMCacheError) and issubclass(InvalidArgumentError, ValueError)
    assert issubclass(InvalidTypeError, LMCacheError) and issubclass(InvalidTypeError, TypeError)
    assert issubclass(SnapshotError, LMCacheError) and issubclass(SnapshotError, ValueError)


# ---- lists and tuples of ints: the in-place fast path must agree with the general one -------


class _IntSub(int):
    pass


class _Indexable:
    """Not an int, but convertible through __index__ (as numpy scalars are)."""

    def __init__(self, v: int) -> None:
        self.v = v

    def __index__(self) -> int:
        return self.v


# values around every 30-bit digit boundary, plus the u32 / u64 limits
EDGE_VALUES = sorted(
    {v for e in (0, 1, 8, 15, 16, 29, 30, 31, 32, 59, 60, 61, 63) for v in (2**e - 1, 2**e, 2**e + 1)}
    | {0, 255, 256, 2**32 - 1, 2**64 - 1}
)


@pytest.mark.parametrize("container", [list, tuple])
def test_list_edge_values_match_buffers(container: Callable[[list[int]], Any]) -> None:
    toks = [v for v in EDGE_VALUES if v < 2**32]
    assert chunk_hashes(container(toks), 4) == chunk_hashes(np.array(toks, dtype=np.uint32), 4)
    keys = EDGE_VALUES
    ix = Index()
    assert ix.admit("A", 0, CPU, hashes=container(keys)) == len(keys)
    # the same keys given as a uint64 buffer name the same chunks
    assert ix.evict("A", 0, CPU, hashes=np.array(keys, dtype=np.uint64)) == len(keys)
    assert len(ix) == 0


@pytest.mark.parametrize("container", [list, tuple])
def test_list_mixed_item_kinds(container: Callable[[list[Any]], Any]) -> None:
    # bools, int subclasses and __index__ objects are accepted as the ints they stand for,
    # wherever they sit among plain ints
    mixed = [1, True, False, _IntSub(7), _Indexable(9), np.int64(11), 2**31, _IntSub(2**32 - 1), 5]
    plain = [1, 1, 0, 7, 9, 11, 2**31, 2**32 - 1, 5]
    assert chunk_hashes(container(mixed), 4) == chunk_hashes(plain, 4)
    ix = Index()
    ix.admit("A", 0, CPU, hashes=container(mixed))
    assert ix.evict("A", 0, CPU, hashes=plain) == len(set(plain))


BAD_LIST_ITEMS: list[tuple[Any, type, str]] = [
    (-1, InvalidArgumentError, r"tokens\[3\] = -1 is out of range"),
    (-(2**40), InvalidArgumentError, r"tokens\[3\] = -1099511627776 is out of range"),
    (2**32, InvalidArgumentError, r"tokens\[3\] = 4294967296 is out of range"),
    (2**64, InvalidArgumentError, r"tokens\[3\] = 18446744073709551616 is out of range"),
    (2**100, InvalidArgumentError, r"tokens\[3\] = 1267650600228229401496703205376 is out"),
    (_IntSub(2**32), InvalidArgumentError, r"tokens\[3\] = 4294967296 is out of range"),
    (_IntSub(-3), InvalidArgumentError, r"tokens\[3\] = -3 is out of range"),
    (1.0, InvalidTypeError, r"tokens\[3\] must be an int, not float"),
    (None, InvalidTypeError, r"tokens\[3\] must be an int, not NoneType"),
]


@pytest.mark.parametrize("container", [list, tuple])
@pytest.mark.parametrize("case", BAD_LIST_ITEMS, ids=[repr(c[0])[:20] for c in BAD_LIST_ITEMS])
def test_list_bad_item_named(container: Callable[[list[Any]], Any], case: tuple[Any, type, str]) -> None:
    bad, exc, msg = case
    ix = fresh()
    before = snapshot(ix)
    toks = container([1, 2, 3, bad] + list(range(600)))
    with pytest.raises(exc, match=msg):
        ix.lookup(toks)
    with pytest.raises(exc, match=msg):
        ix.admit("B", 0, CPU, tokens=toks)
    with pytest.raises(exc, match=msg):
        chunk_hashes(toks)
    assert snapshot(ix) == before


def test_bad_item_after_a_miss_is_still_refused() -> None:
    # the first chunk misses everywhere; the bad item is in a later chunk
    ix = fresh()
    toks = [49_999] * 300 + [-1]
    with pytest.raises(InvalidArgumentError, match=r"tokens\[300\]"):
        ix.lookup(toks)


def test_list_shrunk_by_index_hook() -> None:
    # an __index__ that empties the list mid-conversion: no crash, the items seen so far count
    toks: list[Any] = []

    class Shrinker:
        def __index__(self) -> int:
            del toks[3:]
            return 4

    toks.extend([1, 2, 3, Shrinker(), 5, 6, 7])
    assert chunk_hashes(toks, 2) == chunk_hashes([1, 2, 3, 4], 2)



UNKNOWN_KEYWORD = {
    "register_worker": lambda ix, p: ix.register_worker("a", 0, foo=1),
    "remove_worker": lambda ix, p: ix.remove_worker("a", 0, foo=1),
    "clear": lambda ix, p: ix.clear("a", foo=1),
    "apply_batch": lambda ix, p: ix.apply_batch([], foo=1),
    "dump": lambda ix, p: ix.dump(p, foo=1),
    "load": lambda ix, p: ix.load(p, foo=1),
    "answer_lookups": lambda ix, p: ix.answer_lookups(b"", "e", 0, 10, 10, foo=1),
    "lookup_json_counted": lambda ix, p: ix.lookup_json_counted(b"{}", "e", foo=1),
    "admit": lambda ix, p: ix.admit("a", 0, CPU, tokens=[1], foo=1),
    "lookup": lambda ix, p: ix.lookup([1], foo=1),
    "chunk_hashes": lambda ix, p: chunk_hashes([1], foo=1),
}


@pytest.mark.parametrize("name", sorted(UNKNOWN_KEYWORD))
def test_unknown_keyword_arguments_raise_invalid_type_error(name: str, tmp_path) -> None:
    ix = fresh()
    before = snapshot(ix)
    with pytest.raises(InvalidTypeError, match="foo"):
        UNKNOWN_KEYWORD[name](ix, str(tmp_path / "x.snap"))
    assert snapshot(ix) == before


def test_a_sequence_is_checked_item_by_item_as_it_is_iterated() -> None:
    # a bad first item of a huge range is refused at once, without building the whole sequence
    with pytest.raises(InvalidArgumentError, match=r"tokens\[0\] = -1"):
        chunk_hashes(range(-1, 10**12), CHUNK)
    assert chunk_hashes(range(40), CHUNK) == chunk_hashes(list(range(40)), CHUNK)

