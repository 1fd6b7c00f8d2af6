"""LMCache pull-socket frames read in Rust (``read_lmcache_push``) against msgspec: random streams
of reads (batches of admits and evicts with gaps, unknown workers, empty locations, other
encodings, single-op messages, full syncs, deregistrations, malformed frames) given to one
source with the native path and to another that decodes every frame in Python leave the same
index (the same apply_batch calls, in order), the same counters, the same sequence state and
the same full-sync requests. Frames made by LMCache 0.5.6's own message classes
(tests/fixtures/lmcache_push/) are all taken natively and read as msgspec reads them."""

from __future__ import annotations

import array
import asyncio
import json
from pathlib import Path

import msgpack
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache_rs import Index, read_lmcache_push
from lmcache_rs.controller import lmcache_messages as m
from lmcache_rs.controller.lmcache_source import LMCacheSource
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.registry import Registry
from lmcache_rs.controller.settings import Settings

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "lmcache_push" / "lmcache_0_5_6.msgpack"
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
REGISTERED = [("a", 0), ("b", 1), ("a", 1)]
WORKERS = [*REGISTERED, ("ghost", 0)]
LOCATIONS = [CPU, DISK, CPU, DISK, ""]
# twins (a key and the same value mod 2^64) and the ends of both 64-bit ranges
KEYS = [0, 1, -1, 2**64 - 1, 12345, 2**64 - 12345, -12345, 2**63 - 1, -(2**63), 2**63, 77, 78]


class Recorder:
    """The source's index, recording every apply_batch (keys as u64 lists) before applying it."""

    def __init__(self, index: Index):
        self.index = index
        self.calls: list[list[tuple]] = []

    def apply_batch(self, events):
        self.calls.append([(kind, inst, wid, loc, _u64s(keys)) for kind, inst, wid, loc, keys in events])
        return self.index.apply_batch(events)

    def __getattr__(self, name):
        return getattr(self.index, name)


def _u64s(keys) -> list[int]:
    if isinstance(keys, bytes):
        return array.array("Q", keys).tolist()
    return [k % 2**64 if isinstance(k, int) and -(2**63) <= k < 2**64 else k for k in keys]


def make_source(native: bool) -> LMCacheSource:
    s = Settings(monitor_ports={"pull": 0, "reply": 0}, chunk_size=4, lmcache_max_sync_keys=6)
    metrics = Metrics()
    source = LMCacheSource(s, Registry(Index(4), metrics, 10.0),
                           Recorder(Index(4, key_space="lmcache_builtin", none_hash=0)), metrics)
    source.native_push = native
    for instance_id, worker_id in REGISTERED:
        reply = source.on_request(m.RegisterMsg(instance_id=instance_id, worker_id=worker_id, ip="127.0.0.1",
                                                port=1, peer_init_url=None))
        assert isinstance(reply, m.RegisterRetMsg)
    return source


def state(source: LMCacheSource) -> dict:
    index = source.index
    return {
        "calls": index.calls,
        "holders": sorted(index.holder_counts()),
        "keys": [sorted(index.lookup_keys([k % 2**64]).items()) for k in KEYS],
        "counts": dict(sorted(source.counts.items())),
        "messages": source.socket_messages,
        "metrics": (source.metrics.admits, source.metrics.evicts, source.metrics.syncs),
        "workers": {key: (w.next_seq, w.sync_reason,
                          {loc: (s.sync_id, sorted(s.batches), s.keys, s.events, s.ended, s.done)
                           for loc, s in w.syncs.items()})
                    for key, w in sorted(source.workers.items())},
    }


# -- random streams ----------------------------------------------------------------------
def batch_frame(draw, instance_id: str, worker_id: int, location: str, ops: list, first: int) -> bytes:
    fields = {"type": "BatchedKVOperationMsg", "instance_id": instance_id, "worker_id": worker_id,
              "location": location,
              "operations": [{"op_type": kind, "key": key, "seq_num": first + i} for i, (kind, key) in enumerate(ops)]}
    how = draw(st.integers(0, 12))
    if how <= 7:  # as LMCache encodes it
        return m.encoder.encode(m.BatchedKVOperationMsg(
            instance_id=instance_id, worker_id=worker_id, location=location,
            operations=[(m.AdmitOp if kind == "admit" else m.EvictOp)(key, first + i)
                        for i, (kind, key) in enumerate(ops)]))
    if how == 8:  # fields and op fields in another order
        for op in fields["operations"]:
            op_items = list(op.items())
            op.clear()
            op.update(draw(st.permutations(op_items)))
        return msgpack.packb(dict(draw(st.permutations(list(fields.items())))))
    if how == 9:  # an extra field (msgspec ignores it): left to msgspec
        return msgpack.packb({**fields, draw(st.sampled_from(["x", "type2"])): 1})
    if how == 10:
        return json.dumps(fields).encode()
    if how == 11:  # truncated, or a byte changed
        data = msgpack.packb(fields)
        i = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            return data[:i]
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    return msgpack.packb({**fields, "worker_id": draw(st.sampled_from([True, 1.0, "0"]))})  # wrong type


@st.composite
def streams(draw) -> list[tuple]:
    seq: dict[tuple, int] = {}
    actions: list[tuple] = []
    for _ in range(draw(st.integers(1, 8))):
        what = draw(st.integers(0, 9))
        if what == 0:
            instance_id, worker_id = draw(st.sampled_from(REGISTERED))
            actions.append(("sync_start", instance_id, worker_id, draw(st.sampled_from([CPU, DISK])),
                            draw(st.sampled_from(["s1", "s2"])), draw(st.integers(0, 2))))
            continue
        if what == 1:
            actions.append(("heartbeat", *draw(st.sampled_from(WORKERS))))
            continue
        frames = []
        for _ in range(draw(st.integers(1, 8))):
            instance_id, worker_id = draw(st.sampled_from(WORKERS))
            location = draw(st.sampled_from(LOCATIONS))
            kind = draw(st.integers(0, 12))
            if kind <= 7:
                ops = draw(st.lists(st.tuples(st.sampled_from(["admit", "evict"]), st.sampled_from(KEYS)),
                                    min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=6))
                holder = (instance_id, worker_id, location)
                first = seq.get(holder, 0) + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 5]))
                seq[holder] = first + len(ops)
                frames.append(batch_frame(draw, instance_id, worker_id, location, ops, first))
            elif kind == 8:
                cls = draw(st.sampled_from([m.KVAdmitMsg, m.KVEvictMsg]))
                frames.append(m.encoder.encode(cls(instance_id=instance_id, worker_id=worker_id,
                                                   key=draw(st.sampled_from(KEYS)), location=location,
                                                   seq_num=draw(st.integers(0, 3)))))
            elif kind == 9:
                frames.append(m.encoder.encode(m.FullSyncBatchMsg(
                    instance_id=instance_id, worker_id=worker_id, location=location,
                    sync_id=draw(st.sampled_from(["s1", "s2"])), batch_id=draw(st.integers(0, 2)),
                    keys=draw(st.lists(st.sampled_from(KEYS), max_size=3)))))
            elif kind == 10:
                frames.append(m.encoder.encode(m.FullSyncEndMsg(
                    instance_id=instance_id, worker_id=worker_id, location=location,
                    sync_id=draw(st.sampled_from(["s1", "s2"])), actual_total_keys=1)))
            elif kind == 11:
                frames.append(m.encoder.encode(m.DeRegisterMsg(instance_id=instance_id, worker_id=worker_id,
                                                               ip="127.0.0.1", port=1)))
            else:
                frames.append(draw(st.binary(max_size=40)))
        actions.append(("read", frames))
    return actions


def run(source: LMCacheSource, actions: list[tuple]) -> list:
    replies = []
    for action in actions:
        if action[0] == "read":
            source.on_pull(action[1])
        elif action[0] == "sync_start":
            _, instance_id, worker_id, location, sync_id, batches = action
            reply = source.on_request(m.FullSyncStartMsg(instance_id=instance_id, worker_id=worker_id,
                                                         location=location, sync_id=sync_id, total_keys=batches,
                                                         batch_count=batches))
            replies.append((reply.accepted, reply.error_msg))
        else:
            _, instance_id, worker_id = action
            reply = source.on_request(m.HeartbeatMsg(instance_id=instance_id, worker_id=worker_id, ip="127.0.0.1",
                                                     port=1, peer_init_url=None))
            replies.append([c.reason for c in getattr(reply, "commands", [])])
    return replies


TAKEN = [0, 0]  # frames the native reader took, of all generated


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_native_and_python_paths_agree(actions):
    for action in actions:
        if action[0] == "read":
            TAKEN[0] += sum(end - start for start, end, _ in read_lmcache_push(action[1]))
            TAKEN[1] += len(action[1])

    async def main():
        native, python = make_source(True), make_source(False)
        assert run(native, actions) == run(python, actions)
        assert state(native) == state(python)

    asyncio.run(main())


def test_the_streams_exercise_both_paths():
    # runs after the property test above (file order): a share of each path, not all of one
    assert TAKEN[1] == 0 or 0.2 < TAKEN[0] / TAKEN[1] < 0.8, TAKEN


# -- LMCache's own frames ----------------------------------------------------------------
def fixture_reads() -> list[list[bytes]]:
    return msgspec.msgpack.decode(FIXTURE.read_bytes(), type=list[list[bytes]])


def test_lmcache_frames_are_read_as_msgspec_reads_them():
    batches = 0
    for read in fixture_reads():
        taken = {i for start, end, _ in read_lmcache_push(read) for i in range(start, end)}
        for i, frame in enumerate(read):
            msg = m.decode_push(frame)
            if type(msg) is not m.BatchedKVOperationMsg:
                assert i not in taken
                continue
            batches += 1
            assert i in taken
            [(start, end, [holder])] = read_lmcache_push([frame])
            instance_id, worker_id, location, frames, first, last, gaps, runs = holder
            assert (instance_id, worker_id, location, frames, gaps) == (msg.instance_id, msg.worker_id, msg.location,
                                                                        1, [])
            assert (first, last) == (msg.operations[0].seq_num, msg.operations[-1].seq_num)
            ops = [(kind, k) for kind, keys in runs for k in array.array("q", keys)]
            assert ops == [("admit", op.key) if type(op) is m.AdmitOp else ("evict", op.evicted_key)
                           for op in msg.operations]
    assert batches == 11


def test_lmcache_scenario_gives_the_same_state_both_ways():
    async def main():
        reads = fixture_reads()
        out = []
        for native in (True, False):
            source = make_source(native)
            for instance_id, worker_id in [("inst0", 0), ("inst1", 1)]:
                source.on_request(m.RegisterMsg(instance_id=instance_id, worker_id=worker_id, ip="127.0.0.1",
                                                port=1, peer_init_url=None))
            for i, read in enumerate(reads):
                if i == 3:
                    assert source.on_request(m.FullSyncStartMsg(instance_id="inst1", worker_id=1, location=DISK,
                                                                sync_id="s1", total_keys=2, batch_count=1)).accepted
                source.on_pull(read)
            out.append(state(source))
        assert out[0] == out[1]
        counts = out[0]["counts"]
        assert (counts["seq_gaps"], counts["unknown_worker"], counts["BatchedKVOperationMsg"]) == (1, 2, 11)
        assert out[0]["workers"][("inst0", 0)][1] == "seq_gap"
        assert ("inst1", 1) not in out[0]["workers"]  # deregistered
        assert out[0]["metrics"][2] == 1  # the full sync applied

    asyncio.run(main())
