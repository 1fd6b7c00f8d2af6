"""chunk_hashes: the documented vector, agreement with the reference model, and stability
across processes whatever PYTHONHASHSEED is."""

from __future__ import annotations

import array
import json
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmcache_rs
from lmcache_rs import InvalidArgumentError, InvalidTypeError, chunk_hashes
from reference_model import chunk_hashes as ref_chunk_hashes

# The vector in rust/README.md (also asserted in rust/hash.rs).
DOC_TOKENS = list(range(1, 11))
DOC_VECTOR = [8052976908588476977, 7336208305298077521, 2874354060571158124]
DOC_VECTOR_SEED7 = [470153853844883964, 15613741393757465008, 8796433712124139337]


def test_documented_vector() -> None:
    assert chunk_hashes(DOC_TOKENS, chunk_size=4) == DOC_VECTOR
    assert chunk_hashes(DOC_TOKENS, 4, 7) == DOC_VECTOR_SEED7
    assert ref_chunk_hashes(DOC_TOKENS, 4, 0) == DOC_VECTOR
    assert ref_chunk_hashes(DOC_TOKENS, 4, 7) == DOC_VECTOR_SEED7


def test_defaults_and_edges() -> None:
    toks = list(range(1000))
    assert chunk_hashes(toks) == ref_chunk_hashes(toks, 256, 0)
    assert chunk_hashes([]) == []
    assert len(chunk_hashes([5])) == 1
    assert chunk_hashes([0, 2**32 - 1], 1, 2**64 - 1) == ref_chunk_hashes([0, 2**32 - 1], 1, 2**64 - 1)
    # a prefix has the prefix of the keys
    assert chunk_hashes(toks[:512]) == chunk_hashes(toks)[:2]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 2**32 - 1), max_size=80),
    st.integers(1, 20),
    st.integers(0, 2**64 - 1),
)
def test_matches_reference(tokens: list[int], chunk_size: int, seed: int) -> None:
    assert chunk_hashes(tokens, chunk_size, seed) == ref_chunk_hashes(tokens, chunk_size, seed)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgumentError, match="chunk_size"):
        chunk_hashes([1], chunk_size=0)
    with pytest.raises(InvalidArgumentError, match="seed"):
        chunk_hashes([1], seed=-1)
    with pytest.raises(InvalidArgumentError, match=r"tokens\[1\]"):
        chunk_hashes([1, -1])
    with pytest.raises(InvalidTypeError, match="tokens"):
        chunk_hashes("abc")
    with pytest.raises(InvalidTypeError, match="unexpected keyword"):
        chunk_hashes([1], chunksize=4)  # type: ignore[call-arg]


def test_buffer_inputs_agree() -> None:
    toks = [random.randrange(2**32) for _ in range(700)]
    want = ref_chunk_hashes(toks, 256, 3)
    assert chunk_hashes(array.array("I", toks), 256, 3) == want
    assert chunk_hashes(array.array("I", toks).tobytes(), 256, 3) == want
    assert chunk_hashes(memoryview(array.array("I", toks)), 256, 3) == want


_CHILD = (
    "import json, sys; import lmcache_rs; "
    "print(json.dumps([lmcache_rs.chunk_hashes(list(range(i * 7, i * 7 + 600)), 64, i) for i in range(3)]))"
)


def test_identical_across_processes_and_hash_seeds() -> None:
    outputs = set()
    for hashseed in ("0", "1", "123", "random"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True, timeout=120
        ).stdout
        outputs.add(out)
    assert len(outputs) == 1
    got = json.loads(outputs.pop())
    assert got == [ref_chunk_hashes(list(range(i * 7, i * 7 + 600)), 64, i) for i in range(3)]
    assert lmcache_rs.__version__
