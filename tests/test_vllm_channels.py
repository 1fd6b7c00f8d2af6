"""The vLLM connector's two lines out, without vLLM: the rank channel (scheduler to its
engine's workers, over real ZMQ ipc sockets) and the controller client (a real
lmcache_controller process and a real worker on loopback)."""

from __future__ import annotations

import os
import threading
import time
import uuid

import msgpack
import pytest
import zmq

from fake_worker import ControllerProcess
from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.vllm.controller_client import ControllerClient, parse_url
from lmcache_rs.vllm.rank_channel import RankClient, RankServer, channel_path
from lmcache_rs.worker import KVWorker, synthetic_kv


def endpoints(n: int) -> list[str]:
    engine = uuid.uuid4().hex[:8]
    return [channel_path(engine, 0, rank) for rank in range(n)]


def test_every_rank_answers_in_rank_order():
    paths = endpoints(3)
    servers = [RankServer(p, lambda req, r=r: {"rank": r, "tokens": len(req["tokens"]) - r}) for r, p in enumerate(paths)]
    client = RankClient(paths, timeout=5)
    try:
        for n in (5, 9):
            replies = client.ask({"op": "hold", "tokens": list(range(n))})
            assert [r["rank"] for r in replies] == [0, 1, 2]
            assert [r["tokens"] for r in replies] == [n, n - 1, n - 2]
    finally:
        client.close()
        for s in servers:
            s.close()
    assert not any(os.path.exists(p[len("ipc://"):]) for p in paths)  # sockets removed


def test_channels_of_a_killed_engine_are_removed_by_the_next_and_live_ones_kept():
    # a killed engine never closes its channel: its socket and lock file stay in the temp dir
    # until another engine's channel starts and finds the lock held by nobody
    import signal
    import subprocess
    import sys

    dead = endpoints(1)[0]
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from lmcache_rs.vllm.rank_channel import RankServer\n"
        f"s = RankServer({dead!r}, lambda req: {{}})\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "up"
        live_path = endpoints(1)[0]
        live = RankServer(live_path, lambda req: {"ok": 1})
        try:
            dead_files = [dead[len("ipc://"):], dead[len("ipc://"):] + ".lock"]
            assert all(os.path.exists(f) for f in dead_files)  # its engine still runs: kept
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            assert all(os.path.exists(f) for f in dead_files)  # left behind by the kill
            other = RankServer(endpoints(1)[0], lambda req: {})
            other.close()
            assert not any(os.path.exists(f) for f in dead_files)  # removed: nobody held the lock
            client = RankClient([live_path], timeout=5)
            try:
                replies = client.ask({"op": "hold", "tokens": [1]})
                assert replies is not None and replies[0]["ok"] == 1  # the live one still answers
            finally:
                client.close()
            assert os.path.exists(live_path[len("ipc://"):] + ".lock")
        finally:
            live.close()
        assert not os.path.exists(live_path[len("ipc://"):] + ".lock")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_a_silent_or_failing_rank_makes_the_answer_none_and_late_replies_are_dropped():
    paths = endpoints(2)
    release = threading.Event()

    def slow(req):
        if req["op"] == "slow":
            release.wait(10)
        if req["op"] == "boom":
            raise RuntimeError("store closed")
        return {"op": req["op"]}

    servers = [RankServer(paths[0], lambda req: {"op": req["op"]}), RankServer(paths[1], slow)]
    client = RankClient(paths, timeout=0.3)
    try:
        started = time.monotonic()
        assert client.ask({"op": "slow"}) is None
        assert time.monotonic() - started < 5
        release.set()  # rank 1 now answers the abandoned request, late
        assert client.ask({"op": "next"}) == [{"op": "next", "id": 2}, {"op": "next", "id": 2}]
        assert client.ask({"op": "boom"}) is None  # an exception on a rank is an error reply
        assert client.ask({"op": "fine"})[1]["op"] == "fine"  # the server lives on
    finally:
        client.close()
        for s in servers:
            s.close()


def test_garbage_on_the_channel_is_dropped_and_the_server_keeps_answering():
    (path,) = endpoints(1)
    server = RankServer(path, lambda req: {"ok": True})
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(path)
    client = RankClient([path], timeout=5)
    try:
        raw.send(b"\xc1 not msgpack")
        raw.send(msgpack.packb([1, 2, 3]))  # not a map
        raw.send_multipart([b"a", b"b"])  # three frames at the router
        assert client.ask({"op": "x"})[0]["ok"] is True
    finally:
        raw.close(0)
        client.close()
        server.close()


def test_channel_paths_are_unique_per_engine_and_rank_and_short():
    paths = {channel_path(e, dp, r) for e in ("a", "b") for dp in (0, 1) for r in (0, 1)}
    assert len(paths) == 8
    long = channel_path("x" * 500 + "/../etc", 0, 7)
    assert len(long) < 108 and "/../" not in long[len("ipc://") + 5:]


CS = 4
SHAPE = dict(num_layers=1, num_kv_heads=1, head_dim=4, kv_dtype="float16")


@pytest.fixture
def controller():
    with ControllerProcess(config={"chunk_size": CS}) as c:
        yield c


def test_the_controller_client_sees_other_instances_and_their_p2p_ports(controller):
    worker = KVWorker(config_from_dict({
        "chunk_size": CS, "max_local_cpu_size": 64 * 64 / GB, **SHAPE, "lmcache_instance_id": "peer",
        "enable_controller": True, "controller_pull_url": f"127.0.0.1:{controller.monitor_port}",
        "lmcache_worker_host": "127.0.0.1", "lmcache_worker_ports": 0, "p2p_host": "127.0.0.1", "p2p_init_ports": 0,
    }))
    client = ControllerClient(f"http://127.0.0.1:{controller.http_port}")
    try:
        tokens = list(range(10))
        worker.store(tokens, synthetic_kv(tokens, 1, 1, 4))
        deadline = time.monotonic() + 20
        while client.lookup(tokens) != {"peer": ("LocalCPUBackend", 10)}:
            assert time.monotonic() < deadline, client.lookup(tokens)
            time.sleep(0.05)
        assert client.lookup(tokens[:3] + [99]) == {}
        assert client.p2p_addresses("peer") == {0: ("127.0.0.1", worker.p2p_port)}
        assert client.p2p_addresses("nobody") is None  # a 404
        assert client.lookup(tokens) == {"peer": ("LocalCPUBackend", 10)} and client.failures == 0  # no back-off
    finally:
        client.close()
        worker.close()


def test_a_dead_controller_costs_one_timeout_per_backoff_period():
    now = [0.0]
    client = ControllerClient(f"127.0.0.1:{free_tcp_port()}", timeout=0.2, backoff=5.0, clock=lambda: now[0])
    assert client.lookup([1, 2, 3]) is None and client.failures == 1
    now[0] = 4.9
    assert client.lookup([1, 2, 3]) is None and client.failures == 1  # not even tried
    now[0] = 5.1
    assert client.p2p_addresses("x") is None and client.failures == 2


def test_controller_urls_are_checked():
    assert parse_url("http://localhost:9000") == ("localhost", 9000)
    assert parse_url("127.0.0.1:9000") == ("127.0.0.1", 9000)
    for bad in ("https://h:1", "http://h", "h"):
        with pytest.raises(ValueError, match="http://host:port"):
            parse_url(bad)


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
