"""Snapshots, bootstrap and the log follower against a real nats-server, in process: the
corner cases of replica mode (a stale snapshot publisher, a failed resubscription, a retried
bootstrap, a stream created again, an oversized message)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lmcache_rs import Index
from lmcache_rs.controller import snapshots
from lmcache_rs.controller.follower import Follower
from lmcache_rs.controller.jetstream import STREAM, connect, encode, ensure_stream
from lmcache_rs.controller.replication import Spaces
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


def local_snapshot(directory: Path, seq: int, keys: dict[str, list[int]]) -> None:
    spaces = FakeSpaces()
    for space, ks in keys.items():
        spaces.index_for(space).apply_batch([("admit", "inst", 0, "cpu", ks)])
    snapshots.dump_local(str(directory), seq, spaces.indexes())


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
