"""LMCache's builtin-hash key space: ``lmcache_chunk_hashes`` against the chain computed with
Python's own ``hash()``, ``python_str_hash`` against real interpreters started with
PYTHONHASHSEED, and an ``Index(key_space="lmcache_builtin")`` fed the keys LMCache's workers
would report."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_rs import (
    Index,
    InvalidArgumentError,
    InvalidTypeError,
    SnapshotError,
    chunk_hashes,
    lmcache_chunk_hashes,
    python_str_hash,
)

CPU, GPU = "LocalCPUBackend", "GPU"
I64 = st.integers(-(2**63), 2**63 - 1)
EDGE_NONE_HASHES = [0, 1, -1, -2, 2**61 - 1, -(2**61 - 1), 2**61, -(2**61), 2**63 - 1, -(2**63)]


def py_chain(tokens: list[int], chunk_size: int, none_hash: int) -> list[int]:
    """LMCache 0.5's TokenDatabase chain with the builtin hash (the final partial chunk too)."""
    keys, prev = [], none_hash
    for start in range(0, len(tokens), chunk_size):
        prev = hash((prev, tuple(tokens[start : start + chunk_size]), ()))
        keys.append(prev)
    return keys


# ---- the chain ----------------------------------------------------------------------------


def test_documented_vector() -> None:
    # rust/README.md (also asserted in rust/pyhash.rs)
    toks = list(range(1, 11))
    want = [4965923915475442220, -6292915440479534054, -4729132277562516714]
    assert py_chain(toks, 4, 0) == want
    assert lmcache_chunk_hashes(toks, 4) == want
    assert lmcache_chunk_hashes(toks, chunk_size=4, none_hash=-7) == py_chain(toks, 4, -7)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=700),
    st.integers(1, 300),
    st.one_of(I64, st.sampled_from(EDGE_NONE_HASHES)),
)
def test_matches_builtin_hash(tokens: list[int], chunk_size: int, none_hash: int) -> None:
    assert lmcache_chunk_hashes(tokens, chunk_size, none_hash) == py_chain(tokens, chunk_size, none_hash)


def test_random_long_and_edges() -> None:
    rng = random.Random(1234)
    for _ in range(30):
        toks = [rng.randrange(2**32) for _ in range(rng.randrange(2000))]
        cs = rng.randint(1, 300)
        nh = rng.choice([rng.randrange(-(2**63), 2**63), *EDGE_NONE_HASHES])
        assert lmcache_chunk_hashes(toks, cs, nh) == py_chain(toks, cs, nh)
    for nh in EDGE_NONE_HASHES:
        assert lmcache_chunk_hashes([0, 2**32 - 1, 5], 2, nh) == py_chain([0, 2**32 - 1, 5], 2, nh)
    assert lmcache_chunk_hashes([]) == []
    toks = list(range(1000))
    assert lmcache_chunk_hashes(toks) == py_chain(toks, 256, 0)
    # hash(-1) == hash(-2) == -2, so chains started from either agree
    assert lmcache_chunk_hashes(toks, 7, -1) == lmcache_chunk_hashes(toks, 7, -2)


def test_chain_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="none_hash"):
        lmcache_chunk_hashes([1], none_hash=2**63)
    with pytest.raises(InvalidArgumentError, match="none_hash"):
        lmcache_chunk_hashes([1], none_hash=-(2**63) - 1)
    with pytest.raises(InvalidTypeError, match="none_hash"):
        lmcache_chunk_hashes([1], none_hash=1.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="chunk_size"):
        lmcache_chunk_hashes([1], chunk_size=0)
    with pytest.raises(InvalidArgumentError, match=r"tokens\[0\]"):
        lmcache_chunk_hashes([-1])
    with pytest.raises(InvalidTypeError, match="unexpected keyword"):
        lmcache_chunk_hashes([1], seed=3)  # type: ignore[call-arg]


# ---- str hash against real interpreters ---------------------------------------------------

STRINGS = [
    "",
    "0",
    "1",
    "7",
    "123",
    "4294967295",
    "vllm-none-hash",
    "abcdefg",  # 7, 8, 9, 15, 16, 17 bytes: every tail length around word boundaries
    "abcdefgh",
    "abcdefghi",
    "abcdefghijklmno",
    "abcdefghijklmnop",
    "abcdefghijklmnopq",
    "\x00",
    "caf\xe9 \xff",  # latin-1: one byte a char
    "\u0101\u20ac ucs2",  # two bytes a char
    "emoji \U0001f600!",  # four bytes a char
    "\U0010ffff",
    "x" * 1000,
]
SEEDS = [0, 1, 123, 4294967295]


def interpreters() -> list[str]:
    """This interpreter and every CPython from 3.8 (where the tuple hash became today's) found
    under pyenv or on PATH."""
    found = {os.path.realpath(sys.executable): sys.executable}
    candidates = glob.glob(os.path.expanduser("~/.pyenv/versions/3.[89].*/bin/python3"))
    candidates += glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-9]*/bin/python3"))
    # (pyenv's shims on PATH name versions that may not be selected: the versions are globbed above)
    candidates += [p for minor in range(8, 20) if (p := shutil.which(f"python3.{minor}")) and "/shims/" not in p]
    for path in sorted(candidates):
        found.setdefault(os.path.realpath(path), path)
    return list(found.values())


_CHAIN_CHILD = (
    "import json, sys; cases = json.load(sys.stdin); out = []\n"
    "for tokens, size, prev in cases:\n"
    "    keys = []\n"
    "    for i in range(0, len(tokens), size):\n"
    "        prev = hash((prev, tuple(tokens[i:i + size]), ()))\n"
    "        keys.append(prev)\n"
    "    out.append(keys)\n"
    "print(json.dumps([list(sys.version_info[:2]), out]))"
)


@pytest.mark.parametrize("python", interpreters())
def test_chain_matches_each_interpreter(python: str) -> None:
    """LMCache's chunk keys computed by each interpreter itself (int and tuple hashes do not
    depend on PYTHONHASHSEED, so one run covers every seed)."""
    rng = random.Random(7)
    cases = [([rng.randrange(0, 2**17) for _ in range(rng.randrange(0, 600))], rng.choice([1, 16, 256]),
              rng.choice([0, -1, 2**63 - 1, -2**63, rng.randrange(-2**63, 2**63)])) for _ in range(40)]
    cases.append(([2**31 - 1, 2**32 - 1, 0, 1] * 70, 16, -6197052367682486848))
    out = subprocess.run([python, "-c", _CHAIN_CHILD], input=json.dumps(cases), capture_output=True, text=True,
                         check=True)
    version, want = json.loads(out.stdout)
    assert tuple(version) >= (3, 8)
    for (tokens, size, none_hash), keys in zip(cases, want):
        assert lmcache_chunk_hashes(tokens, size, none_hash) == keys, (python, size, none_hash)


_CHILD = (
    "import json, sys; strs = json.load(sys.stdin); "
    "print(json.dumps([sys.hash_info.algorithm, list(sys.version_info[:2]), [hash(s) for s in strs]]))"
)


@pytest.mark.parametrize("python", interpreters())
def test_str_hash_matches_interpreter(python: str) -> None:
    for seed in SEEDS:
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        out = subprocess.run(
            [python, "-c", _CHILD], input=json.dumps(STRINGS), env=env, capture_output=True, text=True, check=True
        )
        algorithm, version, want = json.loads(out.stdout)
        if algorithm not in ("siphash13", "siphash24"):
            pytest.skip(f"{python} hashes str with {algorithm}")
        assert algorithm == ("siphash24" if tuple(version) < (3, 11) else "siphash13")
        got = [python_str_hash(s, seed, algorithm) for s in STRINGS]
        assert got == want, (python, seed)
        if algorithm == "siphash13":
            assert [python_str_hash(s, seed) for s in STRINGS] == want
        # LMCache's NONE_HASH when vLLM is importable: hash(str(PYTHONHASHSEED))
        assert python_str_hash(str(seed), seed, algorithm) == want[STRINGS.index(str(seed))]


def test_str_hash_in_this_process() -> None:
    seed = os.environ.get("PYTHONHASHSEED")
    if seed is None or seed == "random" or sys.hash_info.algorithm not in ("siphash13", "siphash24"):
        pytest.skip("needs a fixed PYTHONHASHSEED")
    for s in STRINGS:
        assert python_str_hash(s, int(seed), sys.hash_info.algorithm) == hash(s)


def test_str_hash_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="hash_seed"):
        python_str_hash("a", 2**32)
    with pytest.raises(InvalidArgumentError, match="hash_seed"):
        python_str_hash("a", -1)
    with pytest.raises(InvalidArgumentError, match="siphash"):
        python_str_hash("a", 0, "fnv")
    with pytest.raises(InvalidTypeError, match="text"):
        python_str_hash(b"a", 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="text"):
        python_str_hash("\ud800", 0)  # a lone surrogate has no UTF-8 form


# ---- the index over LMCache's keys --------------------------------------------------------


def lookup_json(ix: Index, tokens: list[int]) -> dict[str, list[object]]:
    out = json.loads(ix.lookup_json(json.dumps({"tokens": tokens}).encode(), "e"))
    layout: dict[str, list[object]] = out["layout_info"]
    return layout


def test_index_answers_with_python_keys() -> None:
    rng = random.Random(7)
    for none_hash in [0, -1, rng.randrange(-(2**63), 0), rng.randrange(2**63), -(2**63), 2**63 - 1]:
        cs = rng.randint(1, 40)
        ix = Index(cs, key_space="lmcache_builtin", none_hash=none_hash)
        toks = [rng.randrange(2**32) for _ in range(cs * 9 + rng.randrange(cs))]
        keys = py_chain(toks, cs, none_hash)
        assert any(k < 0 for k in keys) or len(keys) < 4
        ix.admit("A", 0, CPU, hashes=keys[:5])
        ix.admit("B", 0, GPU, hashes=keys)  # includes the final partial chunk
        ix.admit("C", 0, CPU, hashes=keys[:2] + keys[3:])  # a hole at chunk 2
        ix.check_invariants()
        want = {"A": (CPU, 5 * cs), "B": (GPU, len(toks)), "C": (CPU, 2 * cs)}
        assert ix.lookup(toks) == want
        assert lookup_json(ix, toks) == {k: list(v) for k, v in want.items()}
        # a query that diverges inside chunk 3 matches 3 chunks at most
        other = toks[: 3 * cs + cs // 2] + [(t + 1) % 2**32 for t in toks[3 * cs + cs // 2 :]]
        assert ix.lookup(other) == {"A": (CPU, 3 * cs), "B": (GPU, 3 * cs), "C": (CPU, 2 * cs)}
        # tokens= hashes the same chain
        ix.admit("D", 0, CPU, tokens=toks[: 4 * cs])
        assert ix.lookup(toks)["D"] == (CPU, 4 * cs)
        ix.evict("D", 0, CPU, hashes=keys[:1])
        assert "D" not in ix.lookup(toks)
        # signed keys in a batch
        assert ix.apply_batch([("evict", "B", 0, GPU, keys[4:]), ("admit", "E", 0, CPU, keys[:1])]) == (1, len(keys) - 4)
        assert ix.lookup(toks)["B"] == (GPU, 4 * cs)
        assert ix.lookup(toks)["E"] == (CPU, cs)
        # an xxh3 index does not match the same keys by tokens
        x = Index(cs)
        x.admit("A", 0, CPU, hashes=keys)
        assert x.lookup(toks) == {}
        assert chunk_hashes(toks, cs) != [k % 2**64 for k in keys]


def test_signed_keys_are_twos_complement() -> None:
    cs = 4
    toks = list(range(40))
    keys = lmcache_chunk_hashes(toks, cs, -3)
    unsigned = [k % 2**64 for k in keys]
    for keys_in in (keys, unsigned, tuple(keys)):
        ix = Index(cs, key_space="lmcache_builtin", none_hash=-3)
        ix.admit("A", 0, CPU, hashes=keys_in)
        assert ix.lookup(toks) == {"A": (CPU, 40)}
    np = pytest.importorskip("numpy")
    for arr in (np.array(keys, dtype=np.int64), np.array(unsigned, dtype=np.uint64)):
        ix = Index(cs, key_space="lmcache_builtin", none_hash=-3)
        ix.admit("A", 0, CPU, hashes=arr)
        assert ix.lookup(toks) == {"A": (CPU, 40)}
        assert ix.evict("A", 0, CPU, hashes=keys) == len(keys)
    ix = Index(cs, key_space="lmcache_builtin", none_hash=-3)
    with pytest.raises(InvalidArgumentError, match=r"hashes\[1\]"):
        ix.admit("A", 0, CPU, hashes=[1, -(2**63) - 1])
    with pytest.raises(InvalidArgumentError, match=r"hashes\[0\]"):
        ix.admit("A", 0, CPU, hashes=[2**64])
    assert len(ix) == 0


def test_index_key_space_arguments() -> None:
    ix = Index(16, key_space="lmcache_builtin", none_hash=-5)
    assert (ix.chunk_size, ix.key_space, ix.none_hash, ix.seed) == (16, "lmcache_builtin", -5, 0)
    assert repr(ix) == 'Index(chunk_size=16, key_space="lmcache_builtin", none_hash=-5, chunks=0)'
    x = Index(8, 3)
    assert (x.key_space, x.none_hash, x.seed) == ("xxh3", 0, 3)
    assert repr(x) == 'Index(chunk_size=8, key_space="xxh3", seed=3, chunks=0)'
    assert Index(key_space="xxh3").key_space == "xxh3"
    with pytest.raises(InvalidArgumentError, match="seed"):
        Index(16, 1, key_space="lmcache_builtin")
    with pytest.raises(InvalidArgumentError, match="none_hash"):
        Index(16, none_hash=5)
    with pytest.raises(InvalidArgumentError, match="key_space"):
        Index(16, key_space="sha256")
    with pytest.raises(InvalidArgumentError, match="none_hash"):
        Index(16, key_space="lmcache_builtin", none_hash=2**63)
    with pytest.raises(InvalidTypeError, match="key_space"):
        Index(16, key_space=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Index(16, 0, "lmcache_builtin")  # type: ignore[misc]  # keyword-only


# ---- snapshots ------------------------------------------------------------------------------


def test_snapshot_round_trip_and_mismatch(tmp_path: Path) -> None:
    toks = list(range(100))
    ix = Index(8, key_space="lmcache_builtin", none_hash=-(2**63))
    ix.admit("A", 0, CPU, hashes=lmcache_chunk_hashes(toks, 8, -(2**63)))
    ix.admit("B", 1, GPU, tokens=toks[:30])
    path = tmp_path / "snap"
    ix.dump(path)
    back = Index(8, key_space="lmcache_builtin", none_hash=-(2**63))
    back.load(path)
    back.check_invariants()
    assert back.lookup(toks) == ix.lookup(toks) == {"A": (CPU, 100), "B": (GPU, 24)}  # B holds a partial chunk 3
    assert back.holder_counts() == ix.holder_counts()
    for other in (
        Index(8, key_space="lmcache_builtin", none_hash=0),
        Index(8, key_space="lmcache_builtin", none_hash=2**63 - 1),
        Index(8),
        Index(16, key_space="lmcache_builtin", none_hash=-(2**63)),
    ):
        other.admit("K", 0, CPU, tokens=[1, 2, 3])
        with pytest.raises(SnapshotError, match="chunk_size=8, key_space=\"lmcache_builtin\", none_hash=-9223372036854775808"):
            other.load(path)
        assert other.holder_counts() == [("K", 0, CPU, 1)]
    # and an xxh3 snapshot is refused by an lmcache_builtin index
    x = Index(8)
    x.admit("A", 0, CPU, tokens=toks)
    x.dump(tmp_path / "xxh3")
    with pytest.raises(SnapshotError, match='key_space="xxh3", seed=0'):
        back.load(tmp_path / "xxh3")


def test_version_1_snapshot_loads_as_xxh3(tmp_path: Path) -> None:
    toks = list(range(50))
    x = Index(4, 9)
    x.admit("A", 0, CPU, tokens=toks)
    x.admit("B", 2, GPU, hashes=[0, 2**64 - 1])
    x.dump(tmp_path / "v3")
    data = (tmp_path / "v3").read_bytes()
    # version 3: magic, version u32, chunk_size u64, key space u32, seed u64, log_seq u64, ...
    assert struct.unpack_from("<I", data, 8)[0] == 3
    assert struct.unpack_from("<IQQ", data, 20) == (0, 9, 0)
    # version 1 had neither the key space nor the log position
    body = data[:8] + struct.pack("<I", 1) + data[12:20] + data[24:32] + data[40:-8]
    (tmp_path / "v1").write_bytes(body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)))
    back = Index(4, 9)
    back.load(tmp_path / "v1")
    back.check_invariants()
    assert back.lookup(toks) == {"A": (CPU, 50)}
    assert back.holder_counts() == x.holder_counts()
    for other in (Index(4, 8), Index(4, key_space="lmcache_builtin")):
        with pytest.raises(SnapshotError, match="seed=9"):
            other.load(tmp_path / "v1")
    # an unknown key space is refused
    bad = bytearray(data[:-8])
    bad[20:24] = struct.pack("<I", 7)
    (tmp_path / "bad").write_bytes(bytes(bad) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(bad))))
    with pytest.raises(SnapshotError, match="unknown key space 7"):
        back.load(tmp_path / "bad")
