"""Tensor-parallel exactness (docs/design.md, "The lookup contract"): an instance matches a chunk only
when every rank 0..world_size-1 is live and holds it.

Report connections are fed through fake transports into the monitor, with the native index
behind the registry, and every step is checked with a real lookup.
"""

from __future__ import annotations

import asyncio
import time

from fake_transport import attach
from lmcache_rs import Index, chunk_hashes
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.monitor import MonitorProtocol, MonitorServerState
from lmcache_rs.controller.registry import Registry
from lmcache_rs.controller.settings import Settings
from lmcache_rs.wire import FrameDecoder, encode_frame, report

CS = 4
CPU = "LocalCPUBackend"
TOKENS = list(range(12))
KEYS = chunk_hashes(TOKENS, CS, 0)


class Controller:
    def __init__(self, heartbeat_timeout: float = 10.0):
        self.settings = Settings(chunk_size=CS, heartbeat_timeout=heartbeat_timeout)
        self.index = Index(CS, 0)
        self.registry = Registry(self.index, Metrics(), heartbeat_timeout)
        self.state = MonitorServerState(self.settings, self.registry.metrics, self.registry)

    def rank(self, rank: int, world_size: int, keys=(), instance="tp"):
        """A report connection of ``rank``: hello, then a full sync of ``keys``; (protocol, transport, reply)."""
        proto = MonitorProtocol(self.state)
        transport = attach(proto)
        hello = report.Hello(instance_id=instance, worker_id=rank, world_size=world_size, host="127.0.0.1",
                             worker_port=8001 + rank, p2p_host="127.0.0.1", p2p_port=8200 + rank,
                             chunk_size=CS, seed=0)
        proto.data_received(encode_frame(hello.to_message()))
        (reply,) = FrameDecoder().feed(transport.take())
        if reply["t"] == report.WELCOME:
            proto.data_received(encode_frame(report.sync_start(0)) + encode_frame(report.sync_chunk(CPU, keys))
                                + encode_frame(report.sync_end(len(keys))))
        return proto, transport, reply

    def lookup(self) -> dict:
        self.registry.flush()
        return self.index.lookup(TOKENS)


async def settle():
    for _ in range(3):
        await asyncio.sleep(0)


def test_an_instance_matches_only_when_every_rank_is_live_and_holds_the_chunk():
    async def main():
        c = Controller(heartbeat_timeout=10.0)
        p0, _, _ = c.rank(0, 2, KEYS)
        assert c.index.workers() == {"tp": [0, 1]}
        assert c.lookup() == {}  # rank 1 never said hello: rank 0 alone is not the instance
        p1, t1, _ = c.rank(1, 2, KEYS[:2])
        assert c.lookup() == {"tp": (CPU, 8)}  # the prefix both hold
        p1.connection_lost(None)  # rank 1 dies
        await settle()
        assert c.lookup() == {}  # out of reach: the instance stops matching at once
        p1, t1, _ = c.rank(1, 2, KEYS)  # it comes back and syncs
        assert c.lookup() == {"tp": (CPU, 12)}
        p1.connection_lost(None)
        await settle()
        c.registry.workers[("tp", 1)].disconnected_at -= 11.0  # gone longer than the timeout
        c.registry.expire(time.monotonic())  # so it expires for good
        assert ("tp", 1) not in c.registry.workers and ("tp", 0) in c.registry.workers
        assert c.index.workers() == {"tp": [0, 1]} and c.lookup() == {}  # rank 0 never matches alone
        p0.data_received(encode_frame(report.bye()))  # the last rank leaves: the instance is gone
        assert c.index.workers() == {} and c.registry.world_sizes == {}

    asyncio.run(main())


def test_ranks_that_disagree_on_world_size_are_refused_with_a_message():
    async def main():
        c = Controller()
        c.rank(0, 2, KEYS)
        _, t1, reply = c.rank(1, 3, KEYS)
        assert reply["t"] == report.ERROR and reply["code"] == report.CONFIG_MISMATCH
        assert "world_size 3 disagrees with the instance's 2" in reply["message"], reply
        assert t1.closed and ("tp", 1) not in c.registry.workers and c.index.workers() == {"tp": [0, 1]}
        _, _, reply = c.rank(2, 2)  # a rank outside the world
        assert reply["code"] == "bad_field" and "not a rank of world_size 2" in reply["message"]

    asyncio.run(main())


def test_an_instance_none_of_whose_ranks_is_connected_may_come_back_with_another_world_size():
    async def main():
        c = Controller()
        p0, _, _ = c.rank(0, 2, KEYS)
        p0.connection_lost(None)
        await settle()
        p0, _, reply = c.rank(0, 1, KEYS)
        assert reply["t"] == report.WELCOME
        assert c.index.workers() == {"tp": [0]} and c.lookup() == {"tp": (CPU, 12)}

    asyncio.run(main())


def test_a_restored_snapshot_keeps_the_world_size(tmp_path):
    async def main():
        c = Controller()
        c.rank(0, 2, KEYS)
        c.rank(1, 2, KEYS)
        c.registry.flush()
        c.index.dump(tmp_path / "snap")
        restarted = Controller()
        restarted.index.load(tmp_path / "snap")
        assert restarted.registry.restore() == 2
        assert restarted.registry.world_sizes == {"tp": 2}
        assert restarted.lookup() == {"tp": (CPU, 12)}  # answered from the snapshot at once
        _, _, reply = restarted.rank(0, 2, KEYS)
        assert reply["t"] == report.WELCOME

    asyncio.run(main())
