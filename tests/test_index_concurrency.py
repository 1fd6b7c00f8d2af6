"""Readers and writers in parallel threads: every lookup answer must be the reference answer
after some prefix of the serial write order, within the window of writes that completed
before the lookup started and those that could have completed before it ended. Batches must
be seen whole. Invariants hold at the end."""

from __future__ import annotations

import json
import random
import threading
from typing import Any

from lmcache_rs import Index
from reference_model import ReferenceIndex, chunk_hashes

CHUNK = 4
INSTANCES = ["A", "B"]
LOCATIONS = ["GPU", "LocalCPUBackend", "remote"]
BASES = [[(i * (b + 3)) % 17 for i in range(64)] for b in range(3)]
PROBES = [b[:n] for b in BASES for n in (4, 17, 40, 64)]
WRITES_PER_WRITER = 250


def random_write(rng: random.Random) -> tuple[Any, ...]:
    kind = rng.choices(["admit", "evict", "batch", "register", "remove", "clear"], [8, 4, 3, 1, 1, 1])[0]
    inst, w, loc = rng.choice(INSTANCES), rng.randrange(3), rng.choice(LOCATIONS)
    toks = rng.choice(BASES)[: rng.randrange(1, 65)]
    if kind in ("admit", "evict"):
        return (kind, inst, w, loc, toks)
    if kind == "batch":
        evs = []
        for _ in range(rng.randrange(1, 5)):
            evs.append(
                (
                    rng.choice(["admit", "admit", "evict"]),
                    rng.choice(INSTANCES),
                    rng.randrange(3),
                    rng.choice(LOCATIONS),
                    rng.choice(BASES)[: rng.randrange(1, 65)],
                )
            )
        return ("batch", evs)
    if kind == "clear":
        return ("clear", inst, rng.choice([None, loc]))
    return (kind, inst, w)


def apply_index(ix: Index, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind in ("admit", "evict"):
        return getattr(ix, kind)(op[1], op[2], op[3], tokens=op[4])
    if kind == "batch":
        return ix.apply_batch([(k, i, w, loc, chunk_hashes(t, CHUNK)) for k, i, w, loc, t in op[1]])
    if kind == "register":
        return ix.register_worker(op[1], op[2])
    if kind == "remove":
        return ix.remove_worker(op[1], op[2])
    return ix.clear(op[1], op[2])


def apply_ref(ref: ReferenceIndex, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind in ("admit", "evict"):
        return getattr(ref, kind)(op[1], op[2], op[3], chunk_hashes(op[4], CHUNK))
    if kind == "batch":
        a = e = 0
        for k, i, w, loc, t in op[1]:
            if k == "admit":
                a += ref.admit(i, w, loc, chunk_hashes(t, CHUNK))
            else:
                e += ref.evict(i, w, loc, chunk_hashes(t, CHUNK))
        return (a, e)
    if kind == "register":
        return ref.register_worker(op[1], op[2])
    if kind == "remove":
        return ref.remove_worker(op[1], op[2])
    return ref.clear(op[1], op[2])


def test_readers_see_a_prefix_of_the_write_order() -> None:
    ix = Index(chunk_size=CHUNK)
    log: list[tuple[tuple[Any, ...], Any]] = []
    log_lock = threading.Lock()
    stop = threading.Event()
    observations: list[tuple[int, int, int, dict[str, tuple[str, int]]]] = []
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(WRITES_PER_WRITER):
                op = random_write(rng)
                with log_lock:  # the log order is the order the writes took effect
                    result = apply_index(ix, op)
                    log.append((op, result))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        local = []
        try:
            while not stop.is_set():
                p = rng.randrange(len(PROBES))
                lo = len(log)
                if rng.random() < 0.2:
                    body = json.dumps({"tokens": PROBES[p]}).encode()
                    out = json.loads(ix.lookup_json(body, "e"))
                    answer = {k: (v[0], v[1]) for k, v in out["layout_info"].items()}
                else:
                    answer = ix.lookup(PROBES[p])
                hi = len(log) + 1  # a write may be published but not yet logged
                local.append((p, lo, hi, answer))
        except BaseException as e:  # pragma: no cover
            errors.append(e)
        observations.extend(local)

    readers = [threading.Thread(target=reader, args=(100 + i,)) for i in range(3)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    ix.check_invariants()

    # replay the serial order on the reference, remembering every probe's answer after each prefix
    ref = ReferenceIndex(chunk_size=CHUNK)
    answers = [[ref.lookup(p) for p in PROBES]]
    for op, result in log:
        assert apply_ref(ref, op) == result, op
        answers.append([ref.lookup(p) for p in PROBES])
    total = len(log)
    assert total == 2 * WRITES_PER_WRITER
    assert len(observations) > 100
    for p, lo, hi, answer in observations:
        window = range(lo, min(hi, total) + 1)
        assert any(answers[k][p] == answer for k in window), (PROBES[p], lo, hi, answer)
    # the end state is the reference's
    for i, p in enumerate(PROBES):
        assert ix.lookup(p) == answers[total][i]
    assert ix.stats()["holdings"] == sum(len(h) for h in ref.holdings.values())


FIRST_CALLS_AT_ONCE = """
import sys, threading, time

class SlowImport:  # sysconfig imported while the GIL is released, as on a slow filesystem
    def find_spec(self, name, path=None, target=None):
        if name == "sysconfig":
            time.sleep(0.3)
        return None

sys.modules.pop("sysconfig", None)
sys.meta_path.insert(0, SlowImport())
import lmcache_rs
ix = lmcache_rs.Index(chunk_size=4)
go = threading.Barrier(8)

def first_call():
    go.wait()
    ix.lookup([1, 2, 3, 4])  # a list: the first one sets up the direct int read

threads = [threading.Thread(target=first_call) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("done", lmcache_rs.runtime_info()["fast_int_lists"])
"""


def test_first_calls_from_many_threads_at_once_do_not_deadlock() -> None:
    # The direct int read is set up at the first list argument, importing Python modules; a
    # second thread must not wait for that with the GIL held. A fresh interpreter each time.
    import subprocess
    import sys

    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", FIRST_CALLS_AT_ONCE], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("done"), out.stderr

