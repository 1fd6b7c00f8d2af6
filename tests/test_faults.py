"""Faults with real processes on 127.0.0.1: kill -9 of a worker or of the controller under load,
restart, restore from a snapshot, and report connections dropped in the middle of a frame.

The workers are real ``lmcache_rs.worker.KVWorker`` processes (benchmarks/soak.py ``worker``):
churning ones store and evict all the time; stable ones (``--no-churn``) store a fixed set of
prompts and then only heartbeat, so answers before and after a fault can be compared.
Every request loop here is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import soak  # noqa: E402
from soak import Controller, Http, Load, Worker, metrics, query_set  # noqa: E402

from lmcache_rs import chunk_hashes  # noqa: E402
from lmcache_rs.wire import FrameDecoder, encode_frame, pack_u64s  # noqa: E402
from lmcache_rs.wire.report import PROTOCOL_VERSION  # noqa: E402

HEARTBEAT_TIMEOUT = 2.0
QUERIES = query_set(1000)
# labels in alphabetical order, as prometheus_client writes them
_HOLDER = re.compile(r'lmcache_holder_chunks\{instance="([^"]*)",location="([^"]*)",worker="(\d+)"\}')


def run(coro):
    return asyncio.run(coro)


async def holders(port: int) -> dict[tuple[str, int], int]:
    """(instance, worker) -> chunks held, from /metrics."""
    out: dict[tuple[str, int], int] = {}
    for name, value in (await metrics(port)).items():
        m = _HOLDER.match(name)
        if m:
            key = (m.group(1), int(m.group(3)))
            out[key] = out.get(key, 0) + int(value)
    return out


async def answers(port: int, queries: list[list[int]], connections: int = 4) -> list[dict]:
    """/lookup of every query (over a few keep-alive connections), in order."""
    out: list = [None] * len(queries)

    async def part(k: int) -> None:
        http = await Http(port).open()
        try:
            for i in range(k, len(queries), connections):
                out[i] = await http.lookup(queries[i])
        finally:
            await http.close()

    await asyncio.gather(*(part(k) for k in range(connections)))
    return out


async def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(interval)


def stable_workers(tmp_path: Path, controller: Controller, n: int = 3, api_key: str | None = None) -> list[Worker]:
    workers = [Worker(tmp_path, controller.monitor_port, f"stable-{i}", churn=False, capacity_chunks=120 + 40 * i,
                      api_key=api_key) for i in range(n)]
    for w in workers:
        w.ready = w.wait_ready()  # type: ignore[attr-defined]
    return workers


async def synced(port: int, workers: list[Worker]) -> bool:
    """Every worker's whole holding is in the index."""
    held = await holders(port)
    return all(held.get((w.instance, w.worker_id), 0) == w.ready["chunks"] for w in workers)  # type: ignore[attr-defined]


@pytest.fixture
def cleanup():
    procs: list = []
    yield procs
    for p in procs:
        p.kill()


# -- kill -9 of a worker ----------------------------------------------------------------------
def test_kill_worker_under_load_its_entries_go_within_heartbeat_timeout(tmp_path, cleanup):
    controller = Controller(tmp_path, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    cleanup.append(controller)
    controller.start()
    workers = [Worker(tmp_path, controller.monitor_port, f"churn-{i}", store_rate=30, capacity_chunks=150, seed=i)
               for i in range(3)]
    cleanup.extend(workers)
    for w in workers:
        w.wait_ready()
    victim = workers[1]
    port = controller.http_port

    async def main():
        load = Load(port, clients=4, rate=200, queries=QUERIES)
        task = asyncio.ensure_future(load.run())
        await wait_until(lambda: _has(port, victim.instance), 20)
        await asyncio.sleep(1.0)  # under load for a while
        before = load.count
        victim.kill()
        killed_at = time.monotonic()
        await wait_until(lambda: _gone(port, victim.instance), HEARTBEAT_TIMEOUT + 3, interval=0.02)
        gone_after = time.monotonic() - killed_at
        # afterwards no answer names it, and the others still hold their chunks
        after = await answers(port, QUERIES[:300])
        assert not any(victim.instance in a for a in after)
        held = await holders(port)
        assert all(held.get((w.instance, 0), 0) > 0 for w in workers if w is not victim)
        await asyncio.sleep(0.5)
        load.stopping = True
        await asyncio.wait_for(task, 15)
        return gone_after, load.count - before, load.errors

    gone_after, served, errors = run(main())
    print(f"\nworker killed: entries gone after {gone_after:.2f} s (heartbeat timeout {HEARTBEAT_TIMEOUT} s); "
          f"{served} lookups served meanwhile, {len(errors)} errors")
    assert errors == []
    assert served > 100
    # its connection closed with it, so its holdings went then (a rank out of reach is not live);
    # the heartbeat timeout only bounds a worker whose connection stays open
    assert gone_after <= HEARTBEAT_TIMEOUT + 1.0
    assert controller.alive() and controller.errors_logged() == []
    for w in workers:
        if w is not victim:
            assert w.alive() and w.errors_logged() == []


async def _has(port: int, instance: str) -> bool:
    return any(k[0] == instance and n > 0 for k, n in (await holders(port)).items())


async def _none_left(port: int) -> bool:
    return not await holders(port)


async def _gone(port: int, instance: str) -> bool:
    return not any(k[0] == instance for k in await holders(port))


# -- kill -9 of the controller, restart -------------------------------------------------------
def test_kill_controller_under_load_restart_answers_identically_within_5s(tmp_path, cleanup):
    controller = Controller(tmp_path, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    cleanup.append(controller)
    controller.start()
    workers = stable_workers(tmp_path, controller)
    cleanup.extend(workers)
    port = controller.http_port

    async def main():
        await wait_until(lambda: synced(port, workers), 20)
        before = await answers(port, QUERIES)
        assert sum(1 for a in before if a) > 300  # the query set hits
        load = Load(port, clients=4, rate=200, queries=QUERIES)
        task = asyncio.ensure_future(load.run())
        await asyncio.sleep(1.0)
        controller.kill()
        await asyncio.sleep(0.3)  # down for a moment, clients failing
        listening_in = controller.start()
        restarted = time.monotonic()
        matched = None
        polls = 0
        while time.monotonic() - restarted < 10:
            polls += 1
            if await answers(port, QUERIES) == before:
                matched = time.monotonic() - restarted
                break
            await asyncio.sleep(0.05)
        load.stopping = True
        await asyncio.wait_for(task, 15)
        m = await metrics(port)
        return listening_in, matched, polls, m, load

    listening_in, matched, polls, m, load = run(main())
    print(f"\ncontroller killed and restarted: listening after {listening_in:.2f} s; the 1,000 queries answered "
          f"identically {matched:.2f} s after restart ({polls} polls); full syncs on the new controller: "
          f"{int(m['lmcache_full_syncs_total'])}")
    assert matched is not None and matched <= 5.0
    assert m["lmcache_full_syncs_total"] >= len(workers)
    assert controller.alive() and controller.errors_logged() == []
    assert all(w.alive() and w.errors_logged() == [] for w in workers)


def test_restart_with_snapshot_answers_identically_at_once(tmp_path, cleanup):
    snap = tmp_path / "index.snap"
    controller = Controller(tmp_path, "--snapshot", str(snap), "--snapshot-interval", "0.5",
                            heartbeat_timeout=HEARTBEAT_TIMEOUT)
    cleanup.append(controller)
    controller.start()
    workers = stable_workers(tmp_path, controller)
    cleanup.extend(workers)
    port = controller.http_port

    async def main():
        await wait_until(lambda: synced(port, workers), 20)
        before = await answers(port, QUERIES)
        await asyncio.sleep(1.2)  # at least one periodic snapshot after the sync
        # freeze the workers (their connections stay open, so the controller keeps their holdings,
        # as it would not for closed ones), kill -9 the controller, then the workers: nobody can
        # repopulate the restarted controller, its answers come from the file
        for w in workers:
            os.kill(w.proc.pid, signal.SIGSTOP)
        controller.kill()
        for w in workers:
            w.kill()
        assert snap.exists()
        listening_in = controller.start()
        restarted = time.monotonic()
        first = await answers(port, QUERIES)
        answered_in = time.monotonic() - restarted
        assert answered_in < HEARTBEAT_TIMEOUT  # before the restored, absent workers expire
        # and then they do expire
        await wait_until(lambda: _none_left(port), HEARTBEAT_TIMEOUT + 3)
        return listening_in, first == before, answered_in

    listening_in, same, answered_in = run(main())
    print(f"\nrestart from snapshot: listening after {listening_in:.2f} s; the 1,000 queries, asked at once, "
          f"answered identically: {same} (all answered {answered_in:.2f} s after the restart)")
    assert same
    assert controller.errors_logged() == []


def test_snapshot_on_shutdown_and_expiry_of_workers_that_do_not_return(tmp_path, cleanup):
    snap = tmp_path / "index.snap"
    controller = Controller(tmp_path, "--snapshot", str(snap), "--snapshot-interval", "3600",
                            heartbeat_timeout=HEARTBEAT_TIMEOUT)
    cleanup.append(controller)
    controller.start()
    workers = stable_workers(tmp_path, controller, n=1)
    cleanup.extend(workers)
    port = controller.http_port

    async def main():
        await wait_until(lambda: synced(port, workers), 20)
        before = await answers(port, QUERIES[:200])
        assert controller.stop() == 0  # the shutdown snapshot, taken while the worker was live
        workers[0].kill()
        controller.start()
        assert await answers(port, QUERIES[:200]) == before
        # the restored worker never reconnects: dropped after the heartbeat timeout
        await wait_until(lambda: _gone(port, workers[0].instance), HEARTBEAT_TIMEOUT + 3)

    run(main())


# -- report connections dropped mid-frame ---------------------------------------------------
def _hello(instance: str) -> dict:
    return {"t": "hello", "v": PROTOCOL_VERSION, "instance_id": instance, "worker_id": 0, "world_size": 1, "host": "127.0.0.1", "worker_port": 1,
            "p2p_host": "127.0.0.1", "p2p_port": 1, "chunk_size": soak.CHUNK, "seed": 0}


def test_report_connection_dropped_mid_frame(tmp_path, cleanup):
    """A worker's connection dies in the middle of an events frame: nothing of that frame is
    applied, the worker's holdings stop counting with the connection; the controller keeps serving."""
    controller = Controller(tmp_path, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    cleanup.append(controller)
    controller.start()
    port = controller.http_port
    prompt = [5] * (4 * soak.CHUNK)
    extra = [6] * (4 * soak.CHUNK)
    keys = chunk_hashes(prompt, soak.CHUNK, 0)

    def synced_session() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", controller.monitor_port), timeout=5)
        s.sendall(encode_frame(_hello("midframe")))
        decoder = FrameDecoder()
        while not (msgs := decoder.feed(s.recv(65536))):
            pass
        assert msgs[0]["t"] == "welcome"
        s.sendall(encode_frame({"t": "sync_start", "seq": 0})
                  + encode_frame({"t": "sync_chunk", "location": "LocalCPUBackend", "hashes": pack_u64s(keys)})
                  + encode_frame({"t": "sync_end", "count": len(keys)}) + encode_frame({"t": "ping", "id": 1}))
        while not any(m["t"] == "pong" for m in decoder.feed(s.recv(65536))):
            pass
        return s

    def cut_inside_a_frame(s: socket.socket, cut: int, how: str) -> None:
        frame = encode_frame({"t": "events", "seq": 1, "ops": [
            ["evict", "LocalCPUBackend", pack_u64s(keys)],
            ["admit", "GPU", pack_u64s(chunk_hashes(extra, soak.CHUNK, 0))]]})
        s.sendall(frame[:cut])
        if how == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()

    async def main():
        results = []
        for cut, how in [(2, "fin"), (4, "rst"), (20, "fin"), (-1, "rst")]:
            s = synced_session()
            a = await answers(port, [prompt, extra], connections=1)
            assert a == [{"midframe": ["LocalCPUBackend", len(prompt)]}, {}], a  # the synced set stands
            cut_inside_a_frame(s, cut, how)
            # the connection is gone, so the worker is not live: nothing of it matches, and the
            # half frame never applied anything (its admit of `extra` would show)
            await wait_until(lambda: _gone(port, "midframe"), HEARTBEAT_TIMEOUT + 3)
            assert await answers(port, [prompt, extra], connections=1) == [{}, {}]
            results.append((cut, how))
        m = await metrics(port)
        return results, m

    results, m = run(main())
    assert controller.alive() and controller.errors_logged() == []
    assert m.get("lmcache_ingest_frames_total", 0) == 0  # no events frame was ever applied
    print(f"\nreport connection cut mid-frame {len(results)} times: nothing applied, holdings dropped with "
          f"the connection")


def test_worker_reconnects_after_controller_restart_with_api_key(tmp_path, cleanup):
    """kill -9 and restart with an API key: a worker configured with the key comes back; one
    with a wrong key is refused (and keeps retrying, harmlessly)."""
    controller = Controller(tmp_path, heartbeat_timeout=HEARTBEAT_TIMEOUT, env={"LMCACHE_API_KEY": "k1"})
    cleanup.append(controller)
    controller.start()
    good = Worker(tmp_path, controller.monitor_port, "keyed", churn=False, capacity_chunks=80, api_key="k1")
    bad = Worker(tmp_path, controller.monitor_port, "wrongkey", churn=False, capacity_chunks=80, api_key="nope")
    cleanup.extend([good, bad])
    good.ready = good.wait_ready()  # type: ignore[attr-defined]
    bad.wait_ready()
    port = controller.http_port

    async def main():
        await wait_until(lambda: synced(port, [good]), 20)
        controller.kill()
        controller.start()
        await wait_until(lambda: synced(port, [good]), 10)
        await asyncio.sleep(0.5)
        assert ("wrongkey", 0) not in await holders(port)

    run(main())


def test_query_set_is_fixed():
    """The 1,000 queries are the same in every run (the before/after comparison depends on it)."""
    assert len(QUERIES) == 1000
    assert json.dumps(QUERIES[:3]) == json.dumps(query_set(1000)[:3])
