"""Stateful property test: random operation sequences on lmcache_rs.Index against the plain
reference model, with check_invariants() after every step.

Runs at least 10,000 operations (max_examples x stateful_step_count), each followed by lookups
of several token sequences compared with the reference."""

from __future__ import annotations

import array
import json
import os
import tempfile
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lmcache_rs import Index
from reference_model import ReferenceIndex, chunk_hashes, chunk_lengths

CHUNK = 3
INSTANCES = ["A", "B", "C"]
WORKERS = [0, 1, 2]
LOCATIONS = ["GPU", "LocalCPUBackend", "LocalDiskBackend", "remote", "aaa"]
# Token sequences are prefixes of a few bases with some variation, so prefixes are shared.
BASES = [[i % 7 for i in range(24)], [1] * 24, [(i * 13) % 11 for i in range(24)]]

tokens_st = st.builds(
    lambda b, n, tweak: (BASES[b][:n][: max(0, n - 1)] + [tweak]) if tweak is not None and n > 0 else BASES[b][:n],
    st.integers(0, len(BASES) - 1),
    st.integers(0, 24),
    st.none() | st.integers(0, 20),
)


def ref_detailed(ref: ReferenceIndex, tokens: list[int]) -> dict[str, dict[str, Any]]:
    """The documented lookup_detailed, from the reference model's holdings."""
    hashes = chunk_hashes(tokens, ref.chunk_size, ref.seed)
    lengths = chunk_lengths(len(tokens), ref.chunk_size)

    def prefix(pred: Any) -> int:
        n = 0
        for h, ln in zip(hashes, lengths):
            if not pred(ref.holdings.get(h, set())):
                break
            n += ln
        return n

    best = ref.lookup(tokens)
    holders = {h for held in ref.holdings.values() for h in held}
    out: dict[str, dict[str, Any]] = {}
    for inst, w, loc in sorted(holders):
        n = prefix(lambda held: (inst, w, loc) in held)
        if n == 0:
            continue
        d = out.setdefault(
            inst,
            {
                "location": best[inst][0] if inst in best else None,
                "matched_prefix_length": best[inst][1] if inst in best else 0,
                "locations": {},
                "workers": {},
            },
        )
        live = ref.workers[inst]
        d["locations"][loc] = prefix(lambda held: all((inst, x, loc) in held for x in live))
        d["workers"].setdefault(w, {})[loc] = n
    return out


STEPS = [0]  # steps checked in this run (the invariant runs after every step)


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ix = Index(chunk_size=CHUNK, seed=11)
        self.ref = ReferenceIndex(chunk_size=CHUNK, seed=11)
        self.probes: list[list[int]] = [b[:n] for b in BASES for n in (0, 2, 3, 7, 12, 24)]

    def keys(self, tokens: list[int]) -> list[int]:
        return chunk_hashes(tokens, CHUNK, 11)

    @initialize()
    def start(self) -> None:
        pass

    @rule(inst=st.sampled_from(INSTANCES), w=st.sampled_from(WORKERS), loc=st.sampled_from(LOCATIONS), tokens=tokens_st)
    def admit_tokens(self, inst: str, w: int, loc: str, tokens: list[int]) -> None:
        self.probes.append(tokens)
        assert self.ix.admit(inst, w, loc, tokens=tokens) == self.ref.admit(inst, w, loc, self.keys(tokens))

    @rule(
        inst=st.sampled_from(INSTANCES),
        w=st.sampled_from(WORKERS),
        loc=st.sampled_from(LOCATIONS),
        tokens=tokens_st,
        data=st.data(),
    )
    def admit_or_evict_some_hashes(self, inst: str, w: int, loc: str, tokens: list[int], data: Any) -> None:
        keys = self.keys(tokens)
        picked = data.draw(st.lists(st.sampled_from(keys), max_size=len(keys))) if keys else []
        as_array = array.array("Q", picked)
        if data.draw(st.booleans()):
            assert self.ix.admit(inst, w, loc, hashes=as_array) == self.ref.admit(inst, w, loc, picked)
        else:
            assert self.ix.evict(inst, w, loc, hashes=picked) == self.ref.evict(inst, w, loc, picked)

    @rule(inst=st.sampled_from(INSTANCES), w=st.sampled_from(WORKERS), loc=st.sampled_from(LOCATIONS), tokens=tokens_st)
    def evict_tokens(self, inst: str, w: int, loc: str, tokens: list[int]) -> None:
        assert self.ix.evict(inst, w, loc, tokens=tokens) == self.ref.evict(inst, w, loc, self.keys(tokens))

    @rule(
        events=st.lists(
            st.tuples(
                st.sampled_from(["admit", "admit", "evict"]),
                st.sampled_from(INSTANCES),
                st.sampled_from(WORKERS),
                st.sampled_from(LOCATIONS),
                tokens_st,
            )
            | st.tuples(
                st.just("drop"),
                st.sampled_from(INSTANCES),
                st.sampled_from(WORKERS),
                st.none() | st.sampled_from(LOCATIONS),
                st.just([]),
            ),
            max_size=6,
        )
    )
    def batch(self, events: list[tuple[str, str, int, str | None, list[int]]]) -> None:
        got = self.ix.apply_batch([(op, i, w, loc, self.keys(t)) for op, i, w, loc, t in events])
        admitted = evicted = 0
        for op, i, w, loc, t in events:
            if op == "admit":
                admitted += self.ref.admit(i, w, loc, self.keys(t))
            elif op == "evict":
                evicted += self.ref.evict(i, w, loc, self.keys(t))
            else:
                evicted += self.ref._drop(lambda h: h[:2] == (i, w) and (loc is None or h[2] == loc))
        assert got == (admitted, evicted)

    @rule(inst=st.sampled_from(INSTANCES), w=st.sampled_from(WORKERS))
    def register(self, inst: str, w: int) -> None:
        self.ix.register_worker(inst, w)
        self.ref.register_worker(inst, w)

    @rule(inst=st.sampled_from(INSTANCES), w=st.sampled_from(WORKERS))
    def remove(self, inst: str, w: int) -> None:
        assert self.ix.remove_worker(inst, w) == self.ref.remove_worker(inst, w)

    @precondition(lambda self: len(self.ref.holdings) > 0)
    @rule(inst=st.sampled_from(INSTANCES), loc=st.none() | st.sampled_from(LOCATIONS))
    def clear(self, inst: str, loc: str | None) -> None:
        assert self.ix.clear(inst, loc) == self.ref.clear(inst, loc)

    @rule(tokens=tokens_st)
    def detailed(self, tokens: list[int]) -> None:
        assert self.ix.lookup_detailed(tokens) == ref_detailed(self.ref, tokens)

    @rule(tokens=tokens_st)
    def lookup_json(self, tokens: list[int]) -> None:
        out = json.loads(self.ix.lookup_json(json.dumps({"tokens": tokens}).encode(), "ev"))
        want = {i: [loc, n] for i, (loc, n) in self.ref.lookup(tokens).items()}
        assert out == {"event_id": "ev", "layout_info": want, **want}

    @rule()
    def dump_and_load(self) -> None:
        # tmpfs when there is one: dump fsyncs, and this rule runs hundreds of times
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="lmcache_rs_state_", dir=shm)
        os.close(fd)
        try:
            self.ix.dump(path)
            self.ix.load(path)
        finally:
            os.unlink(path)

    @invariant()
    def agrees_with_reference(self) -> None:
        STEPS[0] += 1
        self.ix.check_invariants()
        for t in self.probes[-8:] + self.probes[:18:3]:
            assert self.ix.lookup(t) == self.ref.lookup(t), t
        stats = self.ix.stats()
        assert stats["holdings"] == sum(len(h) for h in self.ref.holdings.values())
        assert stats["chunks"] == len(self.ref.holdings) == len(self.ix)
        assert self.ix.workers() == {i: sorted(w) for i, w in self.ref.workers.items()}
        counts: dict[tuple[str, int, str], int] = {}
        for held in self.ref.holdings.values():
            for h in held:
                counts[h] = counts.get(h, 0) + 1
        assert self.ix.holder_counts() == sorted((i, w, loc, n) for (i, w, loc), n in counts.items())


IndexMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=80,  # runs average ~60-78 steps: > 12,000 steps in all
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestIndexMachine = IndexMachine.TestCase



def test_ran_at_least_10000_steps() -> None:
    if STEPS[0] == 0:
        import pytest

        pytest.skip("the state machine did not run in this session")
    print(f"{STEPS[0]} steps")
    assert STEPS[0] >= 10_000, STEPS[0]
