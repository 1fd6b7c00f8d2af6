"""Snapshots, bootstrap and the log follower against a real nats-server, in process: the
corner cases of replica mode (a stale snapshot publisher, a failed resubscription, a retried
bootstrap, a stream created again, an oversized message)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from pathlib import Path

import pytest

from lmcache_rs import Index
from lmcache_rs.controller import snapshots
from lmcache_rs.controller.follower import Follower, LogGone
from lmcache_rs.controller.ingest import Publisher
from lmcache_rs.controller.oplog import apply_message
from lmcache_rs.controller.jetstream import STREAM, connect, encode, ensure_stream, stream_identity
from lmcache_rs.controller.replication import IngestRole, ReplicaRole, Spaces
from test_replicas import NATS_SERVER, NatsServer

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="no nats-server on this machine")


@pytest.fixture
def nats_url(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def js_for(url: str):
    nc = await connect(url, "test")
    js = nc.jetstream()
    await ensure_stream(js)
    return nc, js


async def publish(js, n: int, ops: list | None = None) -> int:
    seq = 0
    for i in range(n):
        seq = (await js.publish("lmc.ops.rs", encode("rs", 1, i, 0.0, ops or []), stream=STREAM)).seq
    return seq


class FakeSpaces:
    """Key spaces by name, created on first use."""

    def __init__(self):
        self.spaces: dict[str, Index] = {}

    def index_for(self, space: str) -> Index:
        if space not in self.spaces:
            self.spaces[space] = Index(chunk_size=4)
        return self.spaces[space]

    def indexes(self):
        return list(self.spaces.items())

    def reset(self) -> None:
        Spaces.reset(self)  # type: ignore[arg-type]


def local_snapshot(directory: Path, seq: int, keys: dict[str, list[int]], stream: str = "") -> None:
    spaces = FakeSpaces()
    for space, ks in keys.items():
        spaces.index_for(space).apply_batch([("admit", "inst", 0, "cpu", ks)])
    snapshots.dump_local(str(directory), seq, spaces.indexes(), stream)


def test_a_stale_publisher_never_moves_the_shared_snapshot_back(nats_url, tmp_path):
    async def go():
        nc, js = await js_for(nats_url)
        try:
            await publish(js, 20)
            local_snapshot(tmp_path / "a", 15, {"rs": [1, 2, 3]})
            local_snapshot(tmp_path / "b", 5, {"rs": [1]})
            a = snapshots.SharedSnapshots(js, "a", 1.0)
            assert await a.leader()
            await a.publish(str(tmp_path / "a"))
            assert (await js.stream_info(STREAM)).state.first_seq == 16
            # a stale replica becomes publisher (the lease expired, or two leaders at once)
            b = snapshots.SharedSnapshots(js, "b", 1.0)
            await b.publish(str(tmp_path / "b"))
            assert (await snapshots.shared_meta(js))["seq"] == 15
            fresh = FakeSpaces()
            assert await snapshots.bootstrap(js, fresh.index_for, None, fresh.reset) == (15, "shared")
            assert len(fresh.spaces["rs"]) == 3
            f = Follower(nats_url, "fresh", lambda m: None)
            try:
                await f.start(15)  # the stream holds what follows the shared snapshot
            finally:
                await f.stop()
        finally:
            await nc.close()

    run(go())


def test_a_failed_resubscription_is_retried_and_not_ready_meanwhile(nats_url):
    async def go():
        nc, js = await js_for(nats_url)
        got = []
        f = Follower(nats_url, "f", got.append)
        try:
            await publish(js, 3)
            await f.start(0)
            assert await f.wait_applied(3, 10) and f.ready
            real = f.js.stream_info
            calls = 0

            async def flaky(*args, **kwargs):  # JetStream not answering while it recovers
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise TimeoutError("no responders")
                return await real(*args, **kwargs)

            f.js.stream_info = flaky
            await f._resubscribe(99)
            assert not f.ready  # not following until subscribed again
            await publish(js, 1)
            assert await f.wait_applied(4, 10), f.broken
            await asyncio.sleep(0.1)
            assert f.ready and f.broken is None
        finally:
            await f.stop()
            await nc.close()

    run(go())


def test_a_retried_bootstrap_keeps_nothing_of_the_first_load(nats_url, tmp_path):
    async def go():
        nc, js = await js_for(nats_url)
        try:
            await publish(js, 20)
            shared_dir = tmp_path / "shared"
            local_snapshot(shared_dir, 15, {"rs": [1, 2, 3]})  # lmcache empty: left out
            a = snapshots.SharedSnapshots(js, "a", 1.0)
            assert await a.leader()
            await a.publish(str(shared_dir))
            mine = tmp_path / "mine"
            local_snapshot(mine, 10, {"rs": [1], "lmcache": [7, 8]})
            spaces = FakeSpaces()
            # the first attempt loaded the local snapshot, then the stream was purged past it
            spaces.index_for("lmcache").apply_batch([("admit", "inst", 0, "cpu", [7, 8])])
            assert await snapshots.bootstrap(js, spaces.index_for, str(mine), spaces.reset) == (15, "shared")
            assert len(spaces.spaces["lmcache"]) == 0 and spaces.spaces["lmcache"].workers() == {}
            # a local snapshot that fails on its second file: the shared one, and nothing of the first file
            (mine / json.loads((mine / "manifest.json").read_text())["spaces"]["lmcache"]).write_bytes(b"junk")
            manifest = json.loads((mine / "manifest.json").read_text())
            manifest["seq"] = 16
            (mine / "manifest.json").write_text(json.dumps(manifest))
            spaces = FakeSpaces()
            seq, origin = await snapshots.bootstrap(js, spaces.index_for, str(mine), spaces.reset)
            assert (seq, origin) == (15, "shared")
            assert len(spaces.spaces["rs"]) == 3
        finally:
            await nc.close()

    run(go())


def test_a_snapshot_newer_than_the_stream_is_not_used(nats_url, tmp_path):
    async def go():
        nc, js = await js_for(nats_url)
        try:
            await publish(js, 10)
            local_snapshot(tmp_path / "mine", 10, {"rs": [1, 2]})
            a = snapshots.SharedSnapshots(js, "a", 1.0)
            assert await a.leader()
            await a.publish(str(tmp_path / "mine"))
            # the stream is lost and created again (NATS store lost); the meta bucket survived
            await js.delete_stream(STREAM)
            await ensure_stream(js)
            await publish(js, 3)
            spaces = FakeSpaces()
            assert await snapshots.bootstrap(js, spaces.index_for, str(tmp_path / "mine")) == \
                (0, "none")
            assert all(len(ix) == 0 for ix in spaces.spaces.values())
        finally:
            await nc.close()

    run(go())


def test_long_instance_ids_never_make_a_message_the_server_refuses(nats_url):
    async def go():
        from test_replicas import log_messages

        pub = Publisher(nats_url)
        await pub.start()
        try:
            # register ops carry no keys: only their strings make the message large
            for i in range(2000):
                pub.record("rs", ["register", f"{i:04d}" + "x" * 1020, 0, None, None])
            assert await pub.flushed(10) is not None
            # an estimate that is still short: the message goes in parts
            pub.nc._max_payload = 20_000
            for i in range(30):
                pub.record("rs", ["register", f"{i:04d}" + "y" * 1020, 0, None, None])
            assert await pub.flushed(10) is not None
        finally:
            await pub.stop()
        spaces = FakeSpaces()
        for ops in await log_messages(nats_url):
            apply_message(ops, spaces.index_for)
        assert len(spaces.spaces["rs"].workers()) == 2030

    run(go())


def test_replica_state_computes_digests_once_per_applied_sequence_and_says_broken():
    role = ReplicaRole(SimpleNamespace(settings=SimpleNamespace(nats_url="nats://127.0.0.1:1")))
    calls = []
    role.spaces.digests = lambda: calls.append(1) or {"rs": 5}
    assert role.state()["digests"] == {"rs": "5"}
    role.state()
    assert len(calls) == 1
    role.follower.applied = 3
    assert role.state()["digests"] == {"rs": "5"} and len(calls) == 2
    role.follower.broken = "message 4 could not be applied"
    assert role.state()["status"] == "broken"


def fake_controller(url: str, role: str, snapshot: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(settings=SimpleNamespace(nats_url=url, role=role, snapshot=snapshot, snapshot_interval=0.1,
                                                    ingest_resend_fraction=0.0),
                           index=Index(chunk_size=4), lmcache=None, kv_events=None,
                           registry=SimpleNamespace(restore=lambda: 0, by_source={}))


def test_the_ingest_retries_a_bootstrap_the_purge_overtook(nats_url, monkeypatch):
    real_start = Follower.start
    failures = []

    async def start_once_gone(self, applied=0):
        if not failures:
            failures.append(applied)
            raise LogGone("the stream starts further on")
        await real_start(self, applied)

    monkeypatch.setattr(Follower, "start", start_once_gone)

    async def go():
        nc, js = await js_for(nats_url)
        await publish(js, 3, [["rs", "admit", "inst", 0, "cpu", [1, 2]]])
        await nc.close()
        c = fake_controller(nats_url, "ingest")
        ingest = IngestRole(c)
        try:
            await ingest.start()
        finally:
            await ingest.stop()
        assert failures == [0] and len(c.index) == 2

    run(go())


def test_a_replica_started_from_the_shared_snapshot_rewrites_its_older_local_one(nats_url, tmp_path):
    async def go():
        nc, js = await js_for(nats_url)
        try:
            await publish(js, 20)
            local_snapshot(tmp_path / "shared", 15, {"rs": [1, 2, 3]})
            a = snapshots.SharedSnapshots(js, "a", 1.0)
            assert await a.leader()
            await a.publish(str(tmp_path / "shared"))
            mine = tmp_path / "mine"
            local_snapshot(mine, 5, {"rs": [1]})
            role = ReplicaRole(fake_controller(nats_url, "replica", str(mine)))
            try:
                await role.start()  # the stream is idle: no message would make it write one
                assert role.origin == "shared"
                assert snapshots.local_seq(str(mine)) == 15
            finally:
                await role.stop()
        finally:
            await nc.close()

    run(go())


def test_a_broken_replica_stops_snapshotting_and_gives_the_lease_up(nats_url, tmp_path):
    async def go():
        nc, js = await js_for(nats_url)
        try:
            role = ReplicaRole(fake_controller(nats_url, "replica", str(tmp_path / "mine")))
            role.shared = snapshots.SharedSnapshots(js, "broken", 1.0)
            assert await role.shared.leader()
            role.follower.broken = "message 4 could not be applied"
            await asyncio.wait_for(role._snapshot_loop(), 5)
            assert await snapshots.SharedSnapshots(js, "other", 1.0).leader()
        finally:
            await nc.close()

    run(go())


def test_a_snapshot_of_a_stream_created_again_is_not_used_even_when_it_fits(nats_url, tmp_path):
    async def go():
        nc, js = await js_for(nats_url)
        f = Follower(nats_url, "f", lambda m: None)
        try:
            await publish(js, 10)
            old = stream_identity(await js.stream_info(STREAM))
            local_snapshot(tmp_path / "mine", 10, {"rs": [1, 2]}, old)
            a = snapshots.SharedSnapshots(js, "a", 1.0)
            assert await a.leader()
            await a.publish(str(tmp_path / "mine"))
            await f.start(10)
            await js.delete_stream(STREAM)
            await asyncio.sleep(0.01)  # a creation time of its own
            await ensure_stream(js)
            await publish(js, 12)  # past the snapshot's position
            spaces = FakeSpaces()
            assert await snapshots.bootstrap(js, spaces.index_for, str(tmp_path / "mine"), spaces.reset) == \
                (0, "none")
            await f._resubscribe(12)  # a follower of the old stream stops
            assert f.broken is not None and "created again" in f.broken
        finally:
            await f.stop()
            await nc.close()

    run(go())


def test_two_publishers_of_the_same_sequence_leave_the_pointer_on_a_stored_object(nats_url, tmp_path):
    async def go():
        nc, js = await js_for(nats_url)
        try:
            await publish(js, 20)
            local_snapshot(tmp_path / "a", 15, {"rs": [1, 2, 3]})
            local_snapshot(tmp_path / "b", 15, {"rs": [1, 2, 3]})
            a = snapshots.SharedSnapshots(js, "a", 1.0)
            b = snapshots.SharedSnapshots(js, "b", 1.0)
            assert await a.leader()
            # both read the pointer (none yet) before either moved it: two leaders at once
            await asyncio.gather(a.publish(str(tmp_path / "a")), b.publish(str(tmp_path / "b")))
            fresh = FakeSpaces()
            assert await snapshots.bootstrap(js, fresh.index_for, None, fresh.reset) == (15, "shared")
        finally:
            await nc.close()

    run(go())


def test_a_replica_on_a_stream_created_again_rewrites_its_local_snapshot_at_once(nats_url, tmp_path):
    async def go():
        nc, js = await js_for(nats_url)
        try:
            await publish(js, 10)
            mine = tmp_path / "mine"
            local_snapshot(mine, 10, {"rs": [1]}, stream_identity(await js.stream_info(STREAM)))
            await js.delete_stream(STREAM)
            await ensure_stream(js)  # empty: nothing will make the replica write a snapshot
            role = ReplicaRole(fake_controller(nats_url, "replica", str(mine)))
            try:
                await role.start()
                assert role.origin == "none"
                assert snapshots.local_seq(str(mine)) == 0
            finally:
                await role.stop()
        finally:
            await nc.close()

    run(go())


def test_a_replica_overtaken_by_a_purge_recovers_from_the_shared_snapshot(nats_url, tmp_path):
    # the replica stops receiving (as if paused), the log moves on, a shared snapshot is stored
    # and the stream purged below it: the replica finds its next messages gone, says
    # "recovering", loads the shared snapshot again and follows from it to the log's end
    admit = [["rs", "admit", "inst", 0, "cpu", [1, 2]]]

    async def go():
        nc, js = await js_for(nats_url)
        role = ReplicaRole(fake_controller(nats_url, "replica"))
        try:
            await publish(js, 5, admit)
            await role.start()
            f = role.follower
            assert await f.wait_applied(5, 10) and role.state()["status"] == "ok"
            await f._sub.unsubscribe()  # nothing more arrives
            await publish(js, 10, [["rs", "admit", "inst", 0, "cpu", [3]]])  # 6..15, not applied
            local_snapshot(tmp_path / "shared", 15, {"rs": [1, 2, 3]})
            lead = snapshots.SharedSnapshots(js, "other", 1.0)
            assert await lead.leader()
            await lead.publish(str(tmp_path / "shared"))
            await js.purge_stream(STREAM, seq=16)  # keeps 16 on: 6..15 are gone
            last = await publish(js, 2, [["rs", "admit", "inst", 0, "cpu", [4]]])
            assert last == 17
            await f._resubscribe(16)  # what the follower does when a message skips ahead
            assert f.broken is not None and f.recoverable
            assert role.state()["status"] == "recovering" and not role.state()["ready"]
            for _ in range(100):
                if role.state()["status"] == "ok":
                    break
                await asyncio.sleep(0.1)
            state = role.state()
            assert state["status"] == "ok" and state["ready"] and state["recoveries"] == 1, state
            assert state["origin"] == "shared" and state["applied_seq"] == 17
            assert sorted(role.c.index.lookup_keys([k])["inst"][1] for k in (1, 2, 3, 4)) == [1, 1, 1, 1]
        finally:
            await role.stop()
            await nc.close()

    run(go())


def test_a_failed_recovery_is_tried_again(nats_url, monkeypatch):
    # the first reload finds no usable snapshot (it raises): the replica stays "recovering",
    # not ready, and tries again later, which then succeeds
    from lmcache_rs.controller import replication

    real = replication.start_following
    calls = []

    async def fail_once(f, spaces, directory, role):
        calls.append(role)
        if len(calls) == 2:  # the first call is the replica's start; the second, its first reload
            raise LogGone("no usable snapshot yet")
        return await real(f, spaces, directory, role)

    monkeypatch.setattr(replication, "start_following", fail_once)

    async def go():
        nc, js = await js_for(nats_url)
        role = ReplicaRole(fake_controller(nats_url, "replica"))
        try:
            await publish(js, 3, [["rs", "admit", "inst", 0, "cpu", [1]]])
            await role.start()
            f = role.follower
            assert await f.wait_applied(3, 10)
            f.broken, f.recoverable = "the stream starts further on", True  # as _resubscribe sets them
            for _ in range(100):
                if len(calls) >= 2:
                    break
                await asyncio.sleep(0.05)
            state = role.state()
            assert state["status"] == "recovering" and not state["ready"] and state["recoveries"] == 0
            assert "recovery failed" in state["broken"]
            for _ in range(100):  # the next attempt, 2 s later
                if role.state()["status"] == "ok":
                    break
                await asyncio.sleep(0.1)
            state = role.state()
            assert state["status"] == "ok" and state["recoveries"] == 1 and len(calls) == 3, state
            assert state["applied_seq"] == 3 and role.c.index.lookup_keys([1]) == {"inst": ("cpu", 1)}
        finally:
            await role.stop()
            await nc.close()

    run(go())


def test_a_replica_that_cannot_apply_a_message_stays_broken():
    role = ReplicaRole(fake_controller("nats://127.0.0.1:1", "replica"))
    role.follower.broken = "message 4 could not be applied: bad op"
    assert role.state()["status"] == "broken" and not role.follower.recoverable
