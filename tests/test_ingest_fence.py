"""One writer on the log: a second ingest on the same stream fences the first (real nats-server).

The newest ingest claims the log at start; every later publish expects the stream's last
sequence to be the writer's own last message, so the older ingest's next publish is refused:
it stops publishing, reports ``fenced`` and exits with status 3. A publish retried after a lost
ack is never taken for another writer, inside the duplicate window or after it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from lmcache_rs.controller.ingest import WRONG_LAST_SEQUENCE, Publisher
from lmcache_rs.controller.jetstream import DUPLICATE_WINDOW, STREAM, SUBJECTS, connect, decode
from lmcache_rs.controller.replication import EXIT_FENCED, IngestRole
from fake_worker import ControllerProcess, FakeWorker
from test_replica_fixes import fake_controller, nats_url  # noqa: F401  (a fixture)
from test_replicas import CHUNK, CONFIG, NATS_SERVER, SEED, Cluster, Workload, check, http, run

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="no nats-server on this machine")


async def log_entries(url: str) -> list[tuple[int, str, dict]]:
    """(sequence, Nats-Msg-Id, decoded message) of every message in the stream, in order."""
    nc = await connect(url, "test")
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(STREAM, seq)
            out.append((seq, (msg.headers or {}).get("Nats-Msg-Id", ""), decode(msg.data)))
        return out
    finally:
        await nc.close()


def test_a_second_ingest_fences_the_first_and_replicas_follow_the_second(tmp_path):
    with Cluster(tmp_path, replicas=2) as cluster:
        first = cluster.ingest
        second = ControllerProcess(*first.args, config=CONFIG)

        async def main():
            work = Workload(7)
            await work.start(first.monitor_port)
            await work.run(20)
            await check(cluster, work, 2000)
            _, _, a = await http(first.http_port, "GET", "/healthz")
            second.start()  # by mistake, or the standby taking over: it claims the log
            _, _, b = await http(second.http_port, "GET", "/healthz")
            assert b["incarnation"] > a["incarnation"] and b["claim_seq"] > a["last_seq"]
            # sources report to both: a worker of the second, and the first's workers go on
            extra = FakeWorker("inst_b", 0, second.monitor_port, chunk_size=CHUNK, seed=SEED, reconnect=True)
            assert (await extra.start())["t"] == "welcome"
            work.workers[("inst_b", 0)] = extra
            await work.run(20)
            # the first is refused on its next publish: it says why and exits with status 3
            deadline = time.monotonic() + 60
            while first.proc.poll() is None:
                assert time.monotonic() < deadline, first.log()[-3000:]
                await asyncio.sleep(0.05)
            assert first.proc.returncode == EXIT_FENCED, first.log()[-3000:]
            assert f"another ingest writes to stream {STREAM}" in first.log()
            assert f"ingest:{b['incarnation']}:0" in first.log()  # the claim that fenced it
            # its workers report to the second now: each reconnects and full-syncs
            moved = [fw for key, fw in work.workers.items() if key != ("inst_b", 0)]
            for fw in moved:
                fw.monitor = ("127.0.0.1", second.monitor_port)
            for fw in moved:
                deadline = time.monotonic() + 60
                while fw.report is None or fw.report.closed or fw.sync_count < 2:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            cluster.ingest = second
            await work.run(20)
            # the replicas agree with a reference of what every worker holds (the second's view)
            await check(cluster, work, 2000)
            _, _, state = await http(second.http_port, "GET", "/healthz")
            assert state["status"] == "ok" and state["fenced"] is None
            # the log: the first wrote until the second's claim, and never after it
            entries = await log_entries(cluster.nats.url)
            claim = [seq for seq, msg_id, _ in entries if msg_id == f"ingest:{b['incarnation']}:0"]
            assert claim == [b["claim_seq"]]
            before = [m["inc"] for seq, _, m in entries if seq < claim[0]]
            after = [m["inc"] for seq, _, m in entries if seq > claim[0]]
            assert a["incarnation"] in before and after
            assert set(after) == {b["incarnation"]}
            for _, msg_id, m in entries:  # ids carry the incarnation: <src>:<inc>:<n>[.<part>]
                assert msg_id.split(".")[0] == f"{m['src']}:{m['inc']}:{m['n']}"
            await work.close()

        try:
            run(main())
        finally:
            for proc in (first, second):
                if proc is not cluster.ingest:
                    proc.stop()
                    proc._dir.cleanup()


def test_a_fenced_ingest_stops_publishing_and_reports_it(nats_url):  # noqa: F811
    async def go():
        exits = []
        c = fake_controller(nats_url, "ingest")
        c.request_exit = lambda status, reason: exits.append((status, reason))
        c.ops = SimpleNamespace(tasks=set())
        c.registry.workers = {}
        old = IngestRole(c)
        await old.start()
        new = Publisher(nats_url)
        try:
            old.publisher.record("rs", ["register", "inst", 0, None, None])
            assert await old.publisher.flushed(10) is not None
            assert old.state()["status"] == "ok" and old.state()["ready"]
            await new.start()  # takes the log over
            old.publisher.record("rs", ["admit", "inst", 0, "cpu", [1, 2, 3]])
            assert await old.publisher.flushed(10) is None
            reason = old.publisher.fenced
            assert reason is not None and f"another ingest writes to stream {STREAM}" in reason
            assert f"ingest:{new.inc}:0" in reason
            assert exits == [(EXIT_FENCED, "this ingest is fenced")]
            state = old.state()
            assert state["status"] == "fenced" and not state["ready"] and state["fenced"] == reason
            old.publisher.record("rs", ["admit", "inst", 0, "cpu", [4]])  # dropped: nothing more is sent
            assert await old.publisher.flushed(1) is None and old.state()["pending"] == 0
            new.record("rs", ["admit", "inst", 0, "cpu", [5]])
            assert await new.flushed(10) is not None and new.fenced is None
        finally:
            await new.stop()
            await old.stop()
        entries = await log_entries(nats_url)
        assert [m["inc"] for seq, _, m in entries if seq >= new.claim_seq] == [new.inc, new.inc]
        assert not any(op[1] == "admit" and op[5] != [5] for _, _, m in entries for op in m["ops"])

    run(go())


def test_a_publish_retried_after_a_lost_ack_is_not_another_writer(nats_url):  # noqa: F811
    """The stream answers a retried id as a duplicate before it checks the expected sequence;
    after the duplicate window it refuses it, and the ingest finds its own message there."""
    async def go():
        from nats.js.api import StreamConfig, StorageType
        from nats.js.errors import APIError

        nc = await connect(nats_url, "test")
        js = nc.jetstream()
        window = 1.0  # the duplicate window, short so that a retry can outlive it
        await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECTS], storage=StorageType.FILE,
                                         duplicate_window=window))
        assert window < DUPLICATE_WINDOW
        pub = Publisher(nats_url)
        await pub.start()
        try:
            pub.record("rs", ["admit", "inst", 0, "cpu", [1, 2]])
            seq = await pub.flushed(10)
            assert seq == pub.claim_seq + 1
            stored = await js.get_msg(STREAM, seq)
            msg_id = stored.headers["Nats-Msg-Id"]
            # a retry of the same publish (its ack lost): same id, same expected sequence
            await pub._publish("rs", stored.data, msg_id, seq - 1)
            assert pub.duplicates == 1 and pub.fenced is None and pub.last_seq == seq
            # once the stream forgot the id, the same publish is refused as a wrong last sequence
            # (the probe is refused, so it stores nothing)
            while True:
                try:
                    await js.publish("lmc.ops.rs", stored.data, stream=STREAM, headers={
                        "Nats-Msg-Id": msg_id, "Nats-Expected-Last-Sequence": str(seq - 1)})
                except APIError as exc:
                    assert exc.err_code == WRONG_LAST_SEQUENCE
                    break
                await asyncio.sleep(0.2)
            await pub._publish("rs", stored.data, msg_id, seq - 1)  # not fenced: the message there is ours
            assert pub.duplicates == 2 and pub.fenced is None and pub.last_seq == seq
            pub.record("rs", ["admit", "inst", 0, "cpu", [3]])
            assert await pub.flushed(10) == seq + 1
            info = await js.stream_info(STREAM)
            assert info.state.last_seq == info.state.messages == seq + 1  # each stored once
        finally:
            await pub.stop()
            await nc.close()

    run(go())


def test_a_stream_created_again_fences_the_ingest(nats_url):  # noqa: F811
    """Its position means nothing in a new stream: it stops and says so (a restart rebuilds)."""
    async def go():
        from lmcache_rs.controller.jetstream import ensure_stream

        pub = Publisher(nats_url)
        await pub.start()
        nc = await connect(nats_url, "test")
        try:
            pub.record("rs", ["admit", "inst", 0, "cpu", [1]])
            assert await pub.flushed(10) is not None
            js = nc.jetstream()
            await js.delete_stream(STREAM)
            await ensure_stream(js)  # a replica creates it again
            pub.record("rs", ["admit", "inst", 0, "cpu", [2]])
            assert await pub.flushed(30) is None
            assert pub.fenced is not None and "deleted and created again" in pub.fenced
            assert (await js.stream_info(STREAM)).state.messages == 0
        finally:
            await pub.stop()
            await nc.close()

    run(go())
