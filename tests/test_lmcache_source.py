"""The LMCache adapter's decoding and state handling, fed random input (the real LMCache
engines are in tests/interop/)."""

from __future__ import annotations

import asyncio

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_rs import Index, lmcache_chunk_hashes
from lmcache_rs.controller import lmcache_messages as m
from lmcache_rs.controller.lmcache_source import LMCacheSource
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.registry import Registry
from lmcache_rs.controller.settings import Settings
from lmcache_rs.wire.report import Hello

DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_raise_only_decode_errors(data):
    for decode in (m.decode_push, m.decode_request):
        try:
            decode(data)
        except DECODE_ERRORS:
            pass
        try:
            decode(b"{" + data)
        except DECODE_ERRORS:
            pass


def make_source() -> tuple[LMCacheSource, Registry]:
    s = Settings(monitor_ports={"pull": 0, "reply": 0}, chunk_size=4)
    metrics = Metrics()
    registry = Registry(Index(4), metrics, 10.0)
    source = LMCacheSource(s, registry, Index(4, key_space="lmcache_builtin", none_hash=0), metrics)
    return source, registry


def register(source: LMCacheSource, instance_id: str = "a") -> None:
    reply = source.on_request(m.RegisterMsg(instance_id=instance_id, worker_id=0, ip="127.0.0.1", port=1,
                                             peer_init_url=None))
    assert isinstance(reply, m.RegisterRetMsg)


def push(source: LMCacheSource, *msgs) -> None:
    """The messages as one read of the pull socket, encoded as a worker sends them."""
    source.on_pull([m.encoder.encode(msg) for msg in msgs])


def ops(kind: str, keys: list[int], first_seq: int) -> list:
    cls = m.AdmitOp if kind == "admit" else m.EvictOp
    return [cls(k, first_seq + i) for i, k in enumerate(keys)]


def test_admits_evicts_and_gaps():
    async def main():
        source, registry = make_source()
        register(source)
        tokens = list(range(10))
        keys = lmcache_chunk_hashes(tokens, 4, 0)
        push(source, m.BatchedKVOperationMsg(instance_id="a", worker_id=0, location="LocalCPUBackend",
                                             operations=ops("admit", keys, 0)))
        assert source.index.lookup(tokens) == {"a": ("LocalCPUBackend", 10)}
        push(source, m.BatchedKVOperationMsg(instance_id="a", worker_id=0, location="LocalCPUBackend",
                                             operations=ops("evict", keys[1:2], 5)))  # 3 expected: a gap
        assert source.index.lookup(tokens) == {"a": ("LocalCPUBackend", 4)}
        assert source.counts["seq_gaps"] == 1
        beat = source.on_request(m.HeartbeatMsg(instance_id="a", worker_id=0, ip="127.0.0.1", port=1,
                                                 peer_init_url=None))
        assert [c.reason for c in beat.commands] == ["seq_gap"]
        # an unknown worker's report changes nothing
        push(source, m.BatchedKVOperationMsg(instance_id="ghost", worker_id=0, location="LocalCPUBackend",
                                             operations=ops("admit", keys, 0)))
        assert "ghost" not in source.index.lookup(tokens)
        assert registry.by_source[source] == 1

    asyncio.run(main())


def test_full_sync_replaces_holdings_atomically():
    async def main():
        source, _ = make_source()
        register(source)
        old = lmcache_chunk_hashes([9] * 8, 4, 0)
        new = lmcache_chunk_hashes(list(range(8)), 4, 0)
        push(source, m.BatchedKVOperationMsg(instance_id="a", worker_id=0, location="LocalCPUBackend",
                                             operations=ops("admit", old, 0)))
        start = source.on_request(m.FullSyncStartMsg(instance_id="a", worker_id=0, location="LocalCPUBackend",
                                                      sync_id="s1", total_keys=2, batch_count=2))
        assert start.accepted
        push(source, m.FullSyncBatchMsg(instance_id="a", worker_id=0, location="LocalCPUBackend", sync_id="s1",
                                        batch_id=0, keys=new[:1]))
        push(source, m.FullSyncEndMsg(instance_id="a", worker_id=0, location="LocalCPUBackend", sync_id="s1",
                                      actual_total_keys=2))
        status = source.on_request(m.FullSyncStatusMsg(instance_id="a", worker_id=0, sync_id="s1"))
        assert status.missing_batches == [1] and not status.can_exit_freeze
        assert source.index.lookup([9] * 8) == {"a": ("LocalCPUBackend", 8)}  # not applied while incomplete
        push(source, m.FullSyncBatchMsg(instance_id="a", worker_id=0, location="LocalCPUBackend", sync_id="s1",
                                        batch_id=1, keys=new[1:]),
             m.FullSyncEndMsg(instance_id="a", worker_id=0, location="LocalCPUBackend", sync_id="s1",
                              actual_total_keys=2))
        status = source.on_request(m.FullSyncStatusMsg(instance_id="a", worker_id=0, sync_id="s1"))
        assert status.is_complete and status.can_exit_freeze
        assert source.index.lookup([9] * 8) == {}
        assert source.index.lookup(list(range(8))) == {"a": ("LocalCPUBackend", 8)}

    asyncio.run(main())


def test_changes_beyond_what_a_full_sync_may_buffer_ask_for_a_new_sync():
    async def main():
        s = Settings(monitor_ports={"pull": 0, "reply": 0}, chunk_size=4, lmcache_max_sync_keys=2)
        metrics = Metrics()
        registry = Registry(Index(4), metrics, 10.0)
        source = LMCacheSource(s, registry, Index(4, key_space="lmcache_builtin", none_hash=0), metrics)
        register(source)
        start = source.on_request(m.FullSyncStartMsg(instance_id="a", worker_id=0, location="LocalCPUBackend",
                                                      sync_id="s1", total_keys=2, batch_count=1))
        assert start.accepted
        keys = lmcache_chunk_hashes(list(range(12)), 4, 0)
        for i, key in enumerate(keys):  # three changes while the sync runs: one more than it may hold
            push(source, m.BatchedKVOperationMsg(instance_id="a", worker_id=0, location="LocalCPUBackend",
                                                 operations=ops("admit", [key], i)))
        assert source.counts["sync_refused"] == 1
        beat = source.on_request(m.HeartbeatMsg(instance_id="a", worker_id=0, ip="127.0.0.1", port=1,
                                                peer_init_url=None))
        assert [c.reason for c in beat.commands] == ["sync_overflow"]

    asyncio.run(main())


def test_instance_ids_belong_to_one_protocol():
    async def main():
        source, registry = make_source()
        registry.index.register_worker("ours", 0)
        registry.attach(_Conn(), Hello(instance_id="ours", worker_id=0, world_size=1, host="h", worker_port=1,
                                       p2p_host="h", p2p_port=0, chunk_size=256, seed=0))
        reply = source.on_request(m.RegisterMsg(instance_id="ours", worker_id=1, ip="127.0.0.1", port=1,
                                                 peer_init_url=None))
        assert isinstance(reply, m.ErrorMsg) and "another protocol" in reply.error

    asyncio.run(main())


class _Conn:
    def detach(self, replaced: bool) -> None:
        pass


_holders = st.sampled_from([("a", "LocalCPUBackend"), ("a", "LocalDiskBackend"), ("b", "LocalCPUBackend")])
_op = st.tuples(st.sampled_from(["admit", "evict"]), st.integers(-(2**63), 2**64 - 1))
_msg = st.tuples(_holders, st.lists(_op, min_size=1, max_size=8), st.integers(0, 3))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_msg, min_size=1, max_size=6), max_size=6))
def test_random_batches_match_a_set_model(reads):
    """Reads of several messages of mixed ops, for several holders, leave exactly the keys a
    plain set model per holder holds (a key and its value mod 2^64 are one key; seq gaps
    included)."""
    async def main():
        source, _ = make_source()
        register(source, "a")
        register(source, "b")
        model: dict[tuple[str, str], set[int]] = {}
        seq: dict[tuple[str, str], int] = {}
        for read in reads:
            msgs = []
            for (instance_id, location), batch, jump in read:
                first = seq.get((instance_id, location), 0) + jump
                msgs.append(m.BatchedKVOperationMsg(instance_id=instance_id, worker_id=0, location=location,
                                                    operations=[(m.AdmitOp if kind == "admit" else m.EvictOp)(
                                                        key, first + i) for i, (kind, key) in enumerate(batch)]))
                seq[(instance_id, location)] = first + len(batch)
                held = model.setdefault((instance_id, location), set())
                for kind, key in batch:
                    (held.add if kind == "admit" else held.discard)(key % 2**64)
            push(source, *msgs)
        counts = {(i, loc): n for i, _, loc, n in source.index.holder_counts()}
        assert counts == {h: len(keys) for h, keys in model.items() if keys}

    asyncio.run(main())


def test_lmcache_worker_on_the_monitor_port_is_told_the_right_ports():
    """A ZMQ peer (its greeting starts with 0xFF) on --monitor-port gets one log line naming
    LMCache's sockets, not a frame error."""
    import time

    import zmq
    from fake_worker import ControllerProcess

    with ControllerProcess("--monitor-ports", '{"pull": 0, "reply": 0}') as ctl:
        ctx = zmq.Context()
        for _ in range(3):
            push = ctx.socket(zmq.PUSH)
            push.connect(f"tcp://127.0.0.1:{ctl.monitor_port}")
            time.sleep(0.3)
            push.close(0)
        ctx.term()
        deadline = time.monotonic() + 10
        while "ZMQ peer" not in ctl.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = ctl.log()
    assert log.count("ZMQ peer") == 1, log
    assert "controller_pull_url and controller_reply_url set to LMCache's sockets: pull" in log
    assert "frame_too_large" not in log
