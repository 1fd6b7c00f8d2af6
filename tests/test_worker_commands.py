"""The command connection: a controller-side session drives a worker over loopback."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.wire import RemoteError, connect, pack_u32s
from lmcache_rs.worker import KVWorker, synthetic_kv

CS = 4
SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8)
CHUNK_BYTES = 2 * 2 * 2 * 8 * 2 * CS
CPU = "LocalCPUBackend"


def make_config(slots=32, **extra):
    return config_from_dict(
        {"chunk_size": CS, "max_local_cpu_size": slots * CHUNK_BYTES / GB, **SHAPE,
         "lmcache_worker_host": "127.0.0.1", "lmcache_worker_ports": 0,
         "p2p_host": "127.0.0.1", "p2p_init_ports": 0, **extra}
    )


@pytest.fixture
def worker():
    w = KVWorker(make_config())
    yield w
    w.close()


def run(worker, body):
    async def main():
        session = await connect("127.0.0.1", worker.worker_port)
        try:
            return await body(session)
        finally:
            session.close()
            await session.wait_closed()

    return asyncio.run(main())


def test_every_command(worker):
    tokens = list(range(10, 20))
    kv = synthetic_kv(tokens, **SHAPE)
    worker.store(tokens, kv)
    packed = pack_u32s(tokens)

    async def body(s):
        assert await s.call("health") == {"ok": True, "chunks": 3, "locations": {CPU: 3}}
        info = await s.call("info")
        assert info["worker_port"] == worker.worker_port and info["p2p_port"] == worker.p2p_port
        assert info["locations"][CPU]["chunks"] == 3
        assert await s.call("lookup", {"tokens": packed}) == {"matched": 10}
        assert await s.call("pin", {"tokens": packed}) == {"chunks": 3}
        assert await s.call("evict", {"tokens": packed, "location": CPU}) == {"chunks": 0}
        assert await s.call("unpin", {"tokens": packed}) == {"chunks": 3}
        compressed = await s.call("compress", {"tokens": packed, "method": "zlib", "location": CPU})
        assert compressed["chunks"] == 3 and compressed["bytes_after"] < compressed["bytes_before"]
        back = await s.call("decompress", {"tokens": packed, "method": "zlib", "location": None})
        assert back["chunks"] == 3
        assert await s.call("evict", {"tokens": pack_u32s(tokens[:4]), "location": None}) == {"chunks": 1}
        assert await s.call("lookup", {"tokens": packed}) == {"matched": 0}
        # no controller link here: no report frame carries the evictions (seq None)
        assert await s.call("clear", {"location": None}) == {"cleared": 2, "seq": None}
        return await s.call("health")

    assert run(worker, body)["chunks"] == 0


def test_errors_answer_and_keep_the_connection(worker):
    async def body(s):
        failures = []
        for op, args in [
            ("lookup", {"tokens": "not bytes"}),
            ("lookup", {"tokens": b"abc"}),
            ("clear", {"location": "Moon"}),
            ("compress", {"tokens": b"", "method": "lzma"}),
            ("fetch", {"tokens": b"", "source": "x"}),
            ("frobnicate", {}),
        ]:
            with pytest.raises(RemoteError) as info:
                await s.call(op, args)
            failures.append(info.value.error)
        assert "unknown op" in failures[-1]
        assert await s.call("health")  # same connection still answers
        return failures

    run(worker, body)


def test_pipelined_commands_and_fetch_between_workers(worker):
    other = KVWorker(make_config())
    try:
        prompts = [[p * 100 + i for i in range(8)] for p in range(5)]
        for p in prompts:
            other.store(p, synthetic_kv(p, **SHAPE))
        source = ["127.0.0.1", other.p2p_port]

        async def body(s):
            results = await asyncio.gather(
                *(s.call("fetch", {"tokens": pack_u32s(p), "source": source, "location": CPU}) for p in prompts)
            )
            assert all(r == {"chunks": 2, "tokens": 8} for r in results)
            lookups = await asyncio.gather(*(s.call("lookup", {"tokens": pack_u32s(p)}) for p in prompts))
            return [r["matched"] for r in lookups]

        assert run(worker, body) == [8] * 5
        for p in prompts:
            assert torch.equal(worker.retrieve(p)[1], synthetic_kv(p, **SHAPE))
    finally:
        other.close()


def test_fetch_from_a_dead_peer_fails_cleanly(worker):
    async def body(s):
        with pytest.raises(RemoteError, match="failed"):
            await s.call("fetch", {"tokens": pack_u32s([1, 2]), "source": ["127.0.0.1", 1], "location": CPU})
        return await s.call("health")

    assert run(worker, body)["ok"] is True


def test_port_in_use_is_reported():
    first = KVWorker(make_config())
    try:
        with pytest.raises(OSError):
            KVWorker(make_config(lmcache_worker_ports=first.worker_port, p2p_init_ports=None))
    finally:
        first.close()
