"""Monitor-port protocol tests: frames fed through a fake transport into MonitorProtocol.

The index here is the pure-Python stand-in (tests/py_index.py); the same paths run
against the native index in test_controller_process.py.
"""

from __future__ import annotations

import asyncio

import pytest

from fake_transport import attach
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.monitor import MonitorProtocol, MonitorServerState
from lmcache_rs.controller.registry import LIVE, NEED_SYNC, SYNCING, Registry
from lmcache_rs.controller.settings import Settings
from lmcache_rs.wire.report import Hello
from lmcache_rs.wire import FrameDecoder, encode_frame, pack_u64s
from lmcache_rs.wire.framing import _HEADER
from lmcache_rs.wire.report import PROTOCOL_VERSION
from py_index import PyIndex

CPU = "LocalCPUBackend"


class Harness:
    def __init__(self, **settings):
        self.settings = Settings(**settings)
        self.metrics = Metrics()
        self.index = PyIndex(self.settings.chunk_size, self.settings.hash_seed)
        self.registry = Registry(self.index, self.metrics, self.settings.heartbeat_timeout,
                                 max_sync_bytes=self.settings.max_sync_bytes, sync_timeout=self.settings.sync_timeout)
        self.state = MonitorServerState(self.settings, self.metrics, self.registry)

    def connect(self):
        proto = MonitorProtocol(self.state)
        return proto, attach(proto)


def hello(instance="inst", worker=0, world_size=1, **over):
    m = {"t": "hello", "v": PROTOCOL_VERSION, "instance_id": instance, "worker_id": worker, "world_size": world_size,
         "host": "127.0.0.1",
         "worker_port": 8001 + worker, "p2p_host": "127.0.0.1", "p2p_port": 8200 + worker,
         "chunk_size": 256, "seed": 0}
    m.update(over)
    return m


def f(**m) -> bytes:
    return encode_frame(m)


def out(t) -> list[dict]:
    return FrameDecoder().feed(t.take())


def held(index, instance="inst", worker=0, location=CPU) -> set[int]:
    return {k for k, hs in index.ref.holdings.items() if (instance, worker, location) in hs}


def ever_admitted(index, instance="inst", worker=0, location=CPU) -> set[int]:
    return {k for i, w, loc, k in index.admitted if (i, w, loc) == (instance, worker, location)}


def run(coro):
    return asyncio.run(coro)


async def settle():
    for _ in range(3):
        await asyncio.sleep(0)


async def registered(h, instance="inst", worker=0, keys=(), world_size=1):
    """A connection past hello and an (optionally non-empty) full sync."""
    proto, t = h.connect()
    proto.data_received(encode_frame(hello(instance, worker, world_size)))
    (welcome,) = out(t)
    assert welcome["t"] == "welcome" and welcome["v"] == PROTOCOL_VERSION
    proto.data_received(f(t="sync_start", seq=0) + f(t="sync_chunk", location=CPU, hashes=pack_u64s(keys))
                        + f(t="sync_end", count=len(keys)))
    return proto, t


def test_hello_welcome_and_full_sync_registers_holdings():
    async def main():
        h = Harness()
        proto, t = await registered(h, keys=[1, 2, 3])
        assert h.registry.workers[("inst", 0)].state == LIVE
        assert held(h.index) == {1, 2, 3}
        assert h.index.workers() == {"inst": [0]}
        proto.data_received(f(t="events", seq=1, ops=[["admit", CPU, pack_u64s([4])], ["evict", CPU, pack_u64s([1])]]))
        await settle()
        assert held(h.index) == {2, 3, 4}
        assert h.index.batches >= 2
        proto.data_received(f(t="heartbeat", seq=1) + f(t="ping", id=7))
        assert out(t) == [{"t": "pong", "id": 7}]
        proto.data_received(f(t="bye"))
        assert t.closed and h.index.workers() == {} and held(h.index) == set()

    run(main())


def test_frames_of_one_loop_iteration_are_applied_in_one_batch():
    async def main():
        h = Harness()
        p0, _ = await registered(h, worker=0, world_size=2)
        p1, _ = await registered(h, worker=1, world_size=2)
        await settle()
        before = h.index.batches
        p0.data_received(b"".join(f(t="events", seq=i, ops=[["admit", CPU, pack_u64s([i])]]) for i in range(1, 6)))
        p1.data_received(f(t="events", seq=1, ops=[["admit", CPU, pack_u64s([1, 2])]]))
        assert held(h.index, worker=0) == set()  # not yet: applied at the end of the iteration
        await settle()
        assert h.index.batches == before + 1
        assert held(h.index, worker=0) == {1, 2, 3, 4, 5} and held(h.index, worker=1) == {1, 2}
        assert h.metrics.ingest_frames == 6 and h.metrics.admits == 7

    run(main())


@pytest.mark.parametrize("field, value, text", [
    ("chunk_size", 128, "chunk_size 128 (controller uses 256)"),
    ("seed", 5, "hash seed 5 (controller uses 0)"),
    ("v", 1, f"protocol version 1 (controller speaks {PROTOCOL_VERSION})"),
    # a worker without a command port is not registered: every command to it would fail
    ("worker_port", 0, "no command port (worker_port 0); set lmcache_worker_ports"),
])
def test_config_mismatch_is_refused_with_both_values(field, value, text):
    async def main():
        h = Harness()
        proto, t = h.connect()
        proto.data_received(encode_frame(hello(**{field: value})))
        (err,) = out(t)
        assert err["t"] == "error" and err["code"] == "config_mismatch" and text in err["message"]
        assert t.closed and h.registry.workers == {} and h.index.workers() == {}
        assert h.metrics.rejected_frames == {"config_mismatch": 1}

    run(main())


def test_seed_and_chunk_size_come_from_settings():
    async def main():
        h = Harness(chunk_size=16, hash_seed=99)
        proto, t = h.connect()
        proto.data_received(encode_frame(hello(chunk_size=16, seed=99)))
        assert out(t)[0]["t"] == "welcome"

    run(main())


@pytest.mark.parametrize("data, code", [
    (_HEADER.pack(5) + b"\xc1" * 5, "bad_msgpack"),
    (_HEADER.pack(2**31), "frame_too_large"),
    (encode_frame({"no": "type"}), "bad_frame"),
    (encode_frame({"t": "teleport"}), "unknown_type"),
    (encode_frame({"t": "events", "seq": "1", "ops": []}), "bad_field"),
    (encode_frame({"t": "events", "seq": 1, "ops": [["admit", CPU, b"\x00" * 7]]}), "bad_field"),
    (encode_frame({"t": "events", "seq": 1, "ops": [["admit", CPU, [1, 2]]]}), "bad_field"),
    (encode_frame({"t": "events", "seq": 1, "ops": [["upsert", CPU, b""]]}), "bad_field"),
    (encode_frame({"t": "events", "seq": 1, "ops": [["admit", "", b""]]}), "bad_field"),
    (encode_frame({"t": "events", "seq": 1, "ops": [["admit", CPU]]}), "bad_field"),
    (encode_frame({"t": "events", "seq": 1, "ops": {"admit": 1}}), "bad_field"),
    (encode_frame({"t": "sync_chunk", "location": CPU, "hashes": "abc"}), "bad_field"),
    (encode_frame({"t": "heartbeat"}), "bad_field"),
    (encode_frame(hello()), "bad_frame"),
])
def test_bad_frames_get_error_and_close_and_change_nothing(data, code):
    async def main():
        h = Harness(max_frame_bytes=1 << 20)
        proto, t = await registered(h, keys=[10, 11])
        await settle()
        t.take()
        # a good frame, the bad one, then one that would be good
        good = f(t="events", seq=1, ops=[["admit", CPU, pack_u64s([1])]])
        bad_with_admit = data
        after = f(t="events", seq=2, ops=[["admit", CPU, pack_u64s([3])]])
        proto.data_received(good + bad_with_admit + after)
        await settle()
        frames = out(t)
        assert frames[-1]["t"] == "error" and frames[-1]["code"] == code, frames
        assert t.closed
        assert ever_admitted(h.index) == {10, 11, 1}  # the good frame was applied; nothing of the bad one or after
        assert held(h.index) == set()  # then the connection closed: a rank out of reach holds nothing
        assert h.metrics.rejected_frames == {code: 1}

    run(main())


def test_bad_op_after_good_ops_rejects_the_whole_frame():
    async def main():
        h = Harness()
        proto, t = await registered(h, keys=[10])
        proto.data_received(f(t="events", seq=1, ops=[["admit", CPU, pack_u64s([1, 2])], ["evict", CPU, pack_u64s([10])],
                                                      ["admit", CPU, b"\x01"]]))
        await settle()
        assert out(t)[-1]["code"] == "bad_field" and t.closed
        assert ever_admitted(h.index) == {10}

    run(main())


def test_first_frame_must_be_hello_and_reserved_ids_refused():
    async def main():
        h = Harness()
        proto, t = h.connect()
        proto.data_received(f(t="heartbeat", seq=0))
        assert out(t)[0]["code"] == "hello_required" and t.closed
        for name in ("event_id", "layout_info", "detail"):
            proto, t = h.connect()
            proto.data_received(encode_frame(hello(instance=name)))
            err = out(t)[0]
            assert err["code"] == "bad_field" and "reserved" in err["message"]
        proto, t = h.connect()
        proto.data_received(encode_frame(hello(worker_id=-1)))
        assert out(t)[0]["code"] == "bad_field"
        assert h.index.workers() == {}

    run(main())


def test_sequence_gap_asks_for_resync_and_ignores_events_until_sync_end():
    async def main():
        h = Harness()
        proto, t = await registered(h, keys=[1])
        proto.data_received(f(t="events", seq=1, ops=[["admit", CPU, pack_u64s([2])]]))
        proto.data_received(f(t="events", seq=3, ops=[["admit", CPU, pack_u64s([3])]]))  # seq 2 lost
        await settle()
        frames = out(t)
        assert frames == [{"t": "resync", "reason": "events seq 3, expected 2"}]
        rec = h.registry.workers[("inst", 0)]
        assert rec.state == NEED_SYNC and h.metrics.resyncs == 1
        proto.data_received(f(t="events", seq=4, ops=[["admit", CPU, pack_u64s([4])]]))  # ignored
        await settle()
        assert held(h.index) == {1, 2}
        # the worker syncs; events sent during the sync are applied after the synced set
        proto.data_received(f(t="sync_start", seq=4) + f(t="sync_chunk", location=CPU, hashes=pack_u64s([1, 2, 3, 4]))
                            + f(t="events", seq=5, ops=[["evict", CPU, pack_u64s([1])], ["admit", "GPU", pack_u64s([9])]]))
        assert rec.state == SYNCING
        await settle()
        assert held(h.index) == {1, 2}  # nothing changes before sync_end
        proto.data_received(f(t="sync_end", count=4) + f(t="events", seq=6, ops=[["admit", CPU, pack_u64s([5])]]))
        await settle()
        assert rec.state == LIVE
        assert held(h.index) == {2, 3, 4, 5} and held(h.index, location="GPU") == {9}
        assert out(t) == []

    run(main())


def test_heartbeat_gap_and_sync_count_mismatch_resync():
    async def main():
        h = Harness()
        proto, t = await registered(h)
        proto.data_received(f(t="heartbeat", seq=0))
        assert out(t) == []
        proto.data_received(f(t="heartbeat", seq=2))
        assert out(t)[0]["t"] == "resync"
        proto.data_received(f(t="sync_start", seq=2) + f(t="sync_chunk", location=CPU, hashes=pack_u64s([1, 2]))
                            + f(t="sync_end", count=3))
        assert out(t)[0]["reason"] == "sync_end says 3 keys, 2 arrived"
        assert held(h.index) == set()
        # a stray sync_end of the abandoned sync is ignored
        proto.data_received(f(t="sync_end", count=0))
        assert out(t) == [] and not t.closed

    run(main())


def test_full_sync_replaces_holdings_exactly():
    async def main():
        h = Harness()
        proto, t = await registered(h, keys=[1, 2, 3])
        proto.data_received(f(t="events", seq=1, ops=[["admit", "GPU", pack_u64s([7])]]))
        await settle()
        proto.data_received(f(t="sync_start", seq=1) + f(t="sync_chunk", location=CPU, hashes=pack_u64s([3, 4]))
                            + f(t="sync_chunk", location=CPU, hashes=pack_u64s([5])) + f(t="sync_end", count=3))
        assert held(h.index) == {3, 4, 5} and held(h.index, location="GPU") == set()
        assert h.index.workers() == {"inst": [0]}
        # an empty sync leaves the worker registered with nothing
        proto.data_received(f(t="sync_start", seq=1) + f(t="sync_end", count=0))
        assert held(h.index) == set() and h.index.workers() == {"inst": [0]}

    run(main())


def test_an_identity_sticks_to_its_connection_until_it_closes():
    async def main():
        h = Harness(heartbeat_timeout=0.2)
        p1, t1 = await registered(h, keys=[1])
        p2, t2 = h.connect()
        p2.data_received(encode_frame(hello(p2p_port=9999)))  # a stranger claims the live rank
        (err,) = out(t2)
        assert err["t"] == "error" and err["code"] == "worker_in_use" and t2.closed and not t1.closed
        assert f"connected already from {p1.peer}" in err["message"]
        await settle()
        rec = h.registry.workers[("inst", 0)]
        assert rec.conn is p1 and rec.p2p_port == 8200 and held(h.index) == {1}
        p1.connection_lost(None)  # the first connection closes: the identity is free again
        assert rec.conn is None
        import time as _time
        h.registry.expire(_time.monotonic())
        # out of reach, it holds nothing; its record waits for it to come back and sync
        assert held(h.index) == set() and h.index.workers() == {"inst": [0]} and ("inst", 0) in h.registry.workers
        p3, t3 = h.connect()
        p3.data_received(encode_frame(hello()))
        assert out(t3)[0]["t"] == "welcome" and rec.conn is p3
        p3.connection_lost(None)
        h.registry.expire(_time.monotonic() + 0.3)
        assert h.index.workers() == {} and h.registry.workers == {} and h.metrics.workers_expired == 1

    run(main())


def test_a_silent_connection_loses_its_identity_at_the_heartbeat_timeout():
    async def main():
        import time as _time

        h = Harness(heartbeat_timeout=0.2)
        p1, t1 = await registered(h, keys=[1])
        h.registry.expire(_time.monotonic() + 0.5)  # silent: removed, its connection closed
        assert t1.closed and h.registry.workers == {}
        p2, t2 = h.connect()
        p2.data_received(encode_frame(hello()))
        assert out(t2)[0]["t"] == "welcome"

    run(main())


def test_silent_worker_expires():
    async def main():
        import time as _time

        h = Harness(heartbeat_timeout=0.2)
        proto, t = await registered(h, keys=[1])
        h.registry.expire(_time.monotonic() + 0.1)
        assert held(h.index) == {1}
        h.registry.expire(_time.monotonic() + 0.5)
        assert held(h.index) == set() and t.closed

    run(main())


def test_tensor_parallel_instance_needs_every_rank():
    async def main():
        h = Harness()
        p0, _ = await registered(h, worker=0, keys=[1, 2], world_size=2)
        assert h.index.workers() == {"inst": [0, 1]}  # every rank is registered at the first hello
        p1, _ = await registered(h, worker=1, keys=[1], world_size=2)
        # rank 1 asks for a resync: its entries stand until the sync replaces them
        p1.resync("test")
        assert held(h.index, worker=1) == {1}
        p1.data_received(f(t="sync_start", seq=0) + f(t="sync_end", count=0))
        assert held(h.index, worker=1) == set() and h.index.workers() == {"inst": [0, 1]}

    run(main())


def test_api_key_required_when_configured():
    async def main():
        h = Harness(api_key="s3cret")
        for kw, code in [({}, "unauthorized"), ({"api_key": "nope"}, "unauthorized"), ({"api_key": 5}, "bad_field")]:
            proto, t = h.connect()
            proto.data_received(encode_frame(hello(**kw)))
            err = out(t)[0]
            assert err["code"] == code and "s3cret" not in err["message"] and t.closed
            if code == "unauthorized":
                assert "worker inst/0" in err["message"]  # the refusal names the worker
        proto, t = h.connect()
        proto.data_received(encode_frame(hello(api_key="s3cret")))
        assert out(t)[0]["t"] == "welcome"

    run(main())


def test_reserved_ids_are_the_ones_the_native_index_refuses_and_attach_leaves_no_trace():
    # The monitor refuses these names in hello; the index refuses them too. Were the lists to
    # differ, a name only the index refuses used to leave a registry record that never expired.
    from lmcache_rs import Index, InvalidArgumentError
    from lmcache_rs.config import RESERVED_INSTANCE_IDS

    for name in RESERVED_INSTANCE_IDS:
        with pytest.raises(InvalidArgumentError, match="reserved"):
            Index(256, 0).register_worker(name, 0)
    for name in ("event_id_", "Detail", "layout"):
        Index(256, 0).register_worker(name, 0)
    registry = Registry(Index(256, 0), Metrics(), 10.0)
    with pytest.raises(InvalidArgumentError):
        registry.attach(None, Hello(instance_id="detail", worker_id=0, world_size=1, host="h", worker_port=1,
                                    p2p_host="h", p2p_port=2, chunk_size=256, seed=0))
    assert registry.workers == {}


def test_full_syncs_in_progress_share_a_bounded_budget():
    async def main():
        h = Harness(max_sync_bytes=8 * 100)  # 100 keys staged at most, all workers together
        a, ta = h.connect()
        a.data_received(encode_frame(hello("a")) + f(t="sync_start", seq=0)
                        + f(t="sync_chunk", location=CPU, hashes=pack_u64s(range(60))))
        b, tb = h.connect()
        b.data_received(encode_frame(hello("b")) + f(t="sync_start", seq=0)
                        + f(t="sync_chunk", location=CPU, hashes=pack_u64s(range(30))))
        assert h.registry.sync_budget.used == 8 * 90
        # a never-ending sync: the next chunk would go over, so it is refused and closed
        b.data_received(f(t="sync_chunk", location=CPU, hashes=pack_u64s(range(30, 50))))
        err = out(tb)[-1]
        assert err["t"] == "error" and err["code"] == "sync_too_large" and "--max-sync-bytes" in err["message"]
        await settle()
        assert tb.closed and h.registry.sync_budget.used == 8 * 60  # b's staged keys were given back
        # events sent during a sync are staged too
        a.data_received(f(t="events", seq=1, ops=[["admit", CPU, pack_u64s(range(100, 130))]]))
        assert h.registry.sync_budget.used == 8 * 90
        a.data_received(f(t="sync_end", count=60))
        assert h.registry.sync_budget.used == 0 and not ta.closed
        assert held(h.index, instance="a") == set(range(60)) | set(range(100, 130))

    run(main())


def test_a_sync_that_never_ends_gives_its_budget_back_at_the_sync_timeout():
    async def main():
        h = Harness(max_sync_bytes=8 * 100, sync_timeout=30.0, heartbeat_timeout=60.0)
        a, ta = h.connect()
        a.data_received(encode_frame(hello("a")) + f(t="sync_start", seq=0)
                        + f(t="sync_chunk", location=CPU, hashes=pack_u64s(range(90))))
        assert h.registry.sync_budget.used == 8 * 90
        rec = h.registry.workers[("a", 0)]
        h.registry.touch(rec)  # heartbeats keep the connection, but not the sync
        import time as _time
        h.registry.expire(_time.monotonic() + 10)
        assert h.registry.sync_budget.used == 8 * 90  # still within the sync timeout
        rec.last_seen = _time.monotonic() + 31  # (it kept beating)
        h.registry.expire(_time.monotonic() + 31)
        assert h.registry.sync_budget.used == 0 and rec.state == NEED_SYNC
        assert out(ta)[-1]["t"] == "resync" and not ta.closed
        # another worker's sync now has the whole budget
        b, tb = h.connect()
        b.data_received(encode_frame(hello("b")) + f(t="sync_start", seq=0)
                        + f(t="sync_chunk", location=CPU, hashes=pack_u64s(range(100))))
        assert h.registry.sync_budget.used == 8 * 100 and not tb.closed

    run(main())
