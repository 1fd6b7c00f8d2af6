"""GET /controller/key-stats and /controller/workers (LMCache's read-only controller endpoints):
a controller in process with one of our workers (two ranks) and one LMCache worker reporting
through the real ZMQ sockets; the answers are checked against what each worker was told to hold."""

from __future__ import annotations

import asyncio
import random

from fake_worker import FakeWorker, HttpClient, run_with_workers
from lmcache_rs.controller import worker_listing
from lmcache_worker_client import report_admits
from lmcache_rs.controller.server import Controller
from lmcache_rs.controller.settings import Settings

CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"
PEER = "127.0.0.1:8200"


def test_key_stats_and_workers_count_every_workers_holdings():
    rng = random.Random(5)
    cpu_keys = rng.sample(range(1, 10**12), 40)
    disk_keys = cpu_keys[:15] + rng.sample(range(10**12, 2 * 10**12), 7)  # 15 chunks at both tiers

    async def main():
        controller = Controller(Settings(port=0, monitor_port=0, monitor_ports={"pull": 0, "reply": 0}, chunk_size=4))
        await controller.start()
        ranks = [FakeWorker("ours", w, controller.monitor_port, chunk_size=4, world_size=2) for w in (0, 1)]
        try:
            for rank in ranks:
                await rank.start()
            keys0 = ranks[0].admit_tokens(CPU, list(range(40)))  # 10 chunks
            ranks[1].admit_tokens(CPU, list(range(24)))  # 6 chunks
            ranks[1].admit_tokens(DISK, list(range(8)))  # 2 chunks
            for rank in ranks:
                await rank.barrier()
            await report_admits(controller, "lmc", 3, [(CPU, cpu_keys), (DISK, disk_keys)], peer_init_url=PEER)
            async with HttpClient("127.0.0.1", controller.http_port) as http:
                ask = lambda path: http.json("GET", path)  # noqa: E731
                status, stats = await ask("/controller/key-stats")
                assert status == 200
                assert stats == {
                    "total_key_count": 10 + 8 + 40 + 22, "total_instance_count": 2, "total_worker_count": 3,
                    "instances": [{"instance_id": "lmc", "key_count": 62, "worker_count": 1},
                                  {"instance_id": "ours", "key_count": 18, "worker_count": 2}]}

                status, listing = await ask("/controller/workers")
                assert status == 200 and listing["total_count"] == 3
                by_id = {(w["instance_id"], w["worker_id"]): w for w in listing["workers"]}
                assert list(by_id) == [("lmc", 3), ("ours", 0), ("ours", 1)]
                lmc = by_id[("lmc", 3)]
                assert (lmc["ip"], lmc["port"], lmc["peer_init_url"], lmc["key_count"]) == ("127.0.0.1", 1, PEER, 62)
                ours0 = by_id[("ours", 0)]
                assert ours0["port"] == ranks[0].worker_port and ours0["key_count"] == 10
                assert ours0["peer_init_url"] == f"127.0.0.1:{ranks[0].p2p_port}"
                for w in listing["workers"]:
                    assert 0 < w["registration_time"] <= w["last_heartbeat_time"]

                status, one = await ask("/controller/workers?instance_id=ours&worker_id=1")
                assert status == 200 and one == by_id[("ours", 1)] | {"last_heartbeat_time": one["last_heartbeat_time"]}
                assert one["key_count"] == 8
                status, theirs = await ask("/controller/workers?instance_id=lmc")
                assert status == 200 and theirs["total_count"] == 1 and theirs["workers"][0]["worker_id"] == 3
                status, rank1 = await ask("/controller/workers?worker_id=1")
                assert status == 200 and [(w["instance_id"], w["worker_id"]) for w in rank1["workers"]] == [("ours", 1)]

                for path, want in (("/controller/workers?instance_id=nobody", 404),
                                   ("/controller/workers?instance_id=ours&worker_id=7", 404),
                                   ("/controller/workers?instance_id=nobody&worker_id=0", 404),
                                   ("/controller/workers?instance_id=", 404),
                                   ("/controller/workers?instance_id=&worker_id=0", 404),
                                   ("/controller/workers?worker_id=", 400),
                                   ("/controller/workers?worker_id=1_0", 400),
                                   ("/controller/workers?worker_id=one", 400),
                                   ("/controller/workers?worker_id=%ff", 400)):
                    status, body = await ask(path)
                    assert status == want and set(body) == {"error"}, (path, status, body)

                # an eviction and a departed rank show at once
                ranks[0].evict(CPU, keys0[6:])
                await ranks[0].barrier()
                await ranks[1].close()
                for _ in range(200):
                    status, stats = await ask("/controller/key-stats")
                    if stats["total_worker_count"] == 2:
                        break
                    await asyncio.sleep(0.02)
                assert stats["instances"][1] == {"instance_id": "ours", "key_count": 6, "worker_count": 1}
        finally:
            await controller.stop()

    run_with_workers(main())


class Record:
    def __init__(self, instance_id: str, worker_id: int):
        self.instance_id, self.worker_id = instance_id, worker_id
        self.key = (instance_id, worker_id)
        self.host, self.worker_port, self.registered_at, self.last_seen_wall = "h", 1, 1.0, 2.0


def test_listing_queries_against_a_filter_model():
    """Every combination of instance and worker id (present, absent, unknown) against filtering
    the full list: one object for both ids, else the filtered list, 404 where nothing can match."""
    instances = {"a": [Record("a", 0), Record("a", 1)], "b": [Record("b", 1)]}
    counts = worker_listing.key_counts([("a", 0, CPU, 3), ("a", 0, DISK, 2), ("b", 1, CPU, 7), ("z", 0, CPU, 1)])
    assert counts == {("a", 0): 5, ("b", 1): 7, ("z", 0): 1}
    everyone = worker_listing.workers(instances, counts, lambda r: None, None, None)["workers"]
    assert [w["key_count"] for w in everyone] == [5, 0, 7]
    for instance_id in (None, "a", "b", "nobody"):
        for worker_id in (None, 0, 1, 9):
            model = [w for w in everyone if instance_id in (None, w["instance_id"])
                     and worker_id in (None, w["worker_id"])]
            try:
                got = worker_listing.workers(instances, counts, lambda r: None, instance_id, worker_id)
            except worker_listing.NotFound:
                assert instance_id is not None and (instance_id == "nobody" or (worker_id is not None and not model))
                continue
            if instance_id is not None and worker_id is not None:
                assert [got] == model
            else:
                assert got == {"workers": model, "total_count": len(model)}
    stats = worker_listing.key_stats(instances, counts)
    assert stats["total_key_count"] == 12 and stats["total_worker_count"] == 3
    assert worker_listing.parse_worker_query(b"instance_id=a%20b&worker_id=-2&x=1") == ("a b", -2)
    assert worker_listing.parse_worker_query(b"instance_id=&x") == ("", None)
