"""A worker's ports against strangers: with ``controller_api_key`` set, the command and P2P
ports serve only connections that prove the key first; the P2P port allocates only for bytes
that arrived, caps its connections and cuts idle and slow peers."""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc

import pytest

from fake_worker import ControllerProcess, HttpClient
from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.wire import FrameDecoder, SessionError, connect, encode_frame, pack_u64s
from lmcache_rs.wire.auth import auth_frame
from lmcache_rs.worker import KVStore, KVWorker, synthetic_kv
from lmcache_rs.worker.p2p import FramedSocket, P2PServer, TransferError, fetch

CS = 4
SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8)
KEY = "correct horse battery staple"
HOST = "127.0.0.1"
CPU = "LocalCPUBackend"
TOKENS = list(range(16))


def make_config(**extra):
    return config_from_dict({"chunk_size": CS, "max_local_cpu_size": 32 * 256 / GB, **SHAPE,
                             "lmcache_worker_host": HOST, "p2p_host": HOST, **extra})


@pytest.fixture
def keyed():
    worker = KVWorker(make_config(controller_api_key=KEY, lmcache_worker_ports=0, p2p_init_ports=0))
    worker.store(TOKENS, synthetic_kv(TOKENS, **SHAPE))
    yield worker
    worker.close()


def read_frames_until_closed(sock: socket.socket) -> list[dict]:
    """Every frame the server sends until it closes the connection (a timeout fails the test)."""
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return FrameDecoder().feed(data)


@pytest.mark.parametrize("first_frame", [None, auth_frame("wrong key")], ids=["no key", "wrong key"])
def test_the_command_port_refuses_a_stranger(keyed, first_frame):
    async def main():
        session = await connect(HOST, keyed.worker_port)
        if first_frame is not None:
            session.send(first_frame)
        with pytest.raises(SessionError):
            await session.call("clear", {"location": None}, timeout=10)
        await session.wait_closed()
        return session.remote_error

    remote_error = asyncio.run(main())
    assert remote_error is not None and remote_error[0] == "unauthorized"
    assert keyed.lookup(TOKENS) == 16  # nothing was cleared


def test_the_command_port_serves_a_connection_that_proves_the_key(keyed):
    async def main():
        session = await connect(HOST, keyed.worker_port, api_key=KEY)
        health = await session.call("health", timeout=10)
        session.close()
        return health

    assert asyncio.run(main())["chunks"] == 4


@pytest.mark.parametrize("first_frame", [None, auth_frame("wrong key")], ids=["no key", "wrong key"])
def test_the_p2p_port_sends_no_chunk_to_a_stranger(keyed, first_frame):
    with socket.create_connection((HOST, keyed.p2p_port)) as sock:
        # a wrong key is answered at once (a get sent after it could meet a reset connection)
        get = {"t": "get", "id": 1, "keys": pack_u64s(keyed.chunk_keys(TOKENS))}
        sock.sendall(encode_frame(first_frame if first_frame is not None else get))
        frames = read_frames_until_closed(sock)
    assert [(f["t"], f.get("code")) for f in frames] == [("error", "unauthorized")]


def test_a_peer_with_the_key_fetches_and_one_without_cannot(keyed):
    with KVWorker(make_config(controller_api_key=KEY)) as peer:
        with pytest.raises(TransferError, match="unauthorized"):
            fetch(peer.kvstore, TOKENS, (HOST, keyed.p2p_port), CPU)
        assert peer.lookup(TOKENS) == 0
        assert peer.fetch(TOKENS, (HOST, keyed.p2p_port)) == {"chunks": 4, "tokens": 16}
        assert peer.lookup(TOKENS) == 16


def test_a_claimed_frame_length_allocates_nothing_until_its_bytes_arrive():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall((60 << 20).to_bytes(4, "big") + b"\x81\xa1t")  # 60 MiB claimed, 3 bytes sent
        theirs.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            with pytest.raises(TransferError, match="closed inside a frame"):
                FramedSocket(ours, 64 << 20).read_frame()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20


@pytest.fixture
def store():
    s = KVStore(make_config())
    yield s
    s.close()


def test_connections_over_the_cap_are_refused(store):
    server = P2PServer(store, HOST, 0, 1 << 20, max_connections=2)
    server.start()
    try:
        held = [socket.create_connection((HOST, server.port)) for _ in range(2)]
        for sock in held:  # each is being served (a request answered) before the next connects
            sock.sendall(encode_frame({"t": "get", "id": 1, "keys": b""}))
            sock.settimeout(10)
            assert FrameDecoder().feed(sock.recv(65536))[0]["t"] == "end"
        with socket.create_connection((HOST, server.port)) as third:
            frames = read_frames_until_closed(third)
        assert [(f["t"], f.get("code")) for f in frames] == [("error", "too_many_connections")]
        for sock in held:
            sock.close()
    finally:
        server.close()


@pytest.mark.parametrize("behaviour", ["idle", "slow", "not reading"])
def test_idle_and_slow_peers_are_cut(store, behaviour):
    keys = pack_u64s(store.chunk_keys(TOKENS))
    server = P2PServer(store, HOST, 0, 4 << 20, idle_timeout=0.3, io_timeout=0.3)
    server.start()
    try:
        store.store(TOKENS, synthetic_kv(TOKENS, **SHAPE))
        with socket.create_connection((HOST, server.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            if behaviour == "slow":  # a frame that never completes
                sock.sendall(encode_frame({"t": "get", "id": 1, "keys": keys})[:6])
            elif behaviour == "not reading":  # asks for 32 MiB of chunks, far beyond what socket buffers hold
                sock.sendall(encode_frame({"t": "get", "id": 1, "keys": keys * 32768}))
            # the server must cut the connection on its own: nothing here reads or closes until it has
            deadline = time.monotonic() + 20
            while server.connection_count() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.connection_count() == 0
    finally:
        server.close()


def test_the_controller_proves_the_key_on_the_command_connection():
    with ControllerProcess("--api-key", KEY, config={"chunk_size": CS}) as proc:
        config = make_config(controller_api_key=KEY, lmcache_worker_ports=0, enable_controller=True,
                             controller_pull_url=f"{HOST}:{proc.monitor_port}", report_interval=0.001)
        with KVWorker(config) as worker:
            assert worker.reporter.synced.wait(10)
            worker.store(TOKENS, synthetic_kv(TOKENS, **SHAPE))

            async def main():
                async with HttpClient(HOST, proc.http_port) as http:
                    return await http.request("POST", "/clear", {"instance_id": config.lmcache_instance_id,
                                                                "location": None},
                                              headers={"Authorization": f"Bearer {KEY}"})

            status, _, body = asyncio.run(main())
            assert status == 200, body
            assert worker.lookup(TOKENS) == 0



@pytest.mark.parametrize("port", ["worker_port", "p2p_port"])
def test_a_stranger_cannot_send_a_large_first_frame(keyed, port):
    """Before the key is proven a frame is at most an auth frame's size: a stranger announcing
    1 MiB is refused at the header, before a byte of it is buffered."""
    with socket.create_connection((HOST, getattr(keyed, port)), timeout=10) as s:
        s.sendall((1 << 20).to_bytes(4, "big"))  # (more bytes unread by a closing server would reset)
        (error,) = read_frames_until_closed(s)
    assert error["t"] == "error" and error["code"] == "frame_too_large"


def test_a_stranger_that_stays_silent_is_cut_at_the_auth_deadline(monkeypatch):
    import lmcache_rs.wire.session as session_module
    import lmcache_rs.worker.p2p as p2p_module

    monkeypatch.setattr(session_module, "AUTH_TIMEOUT", 0.5)
    monkeypatch.setattr(p2p_module, "AUTH_TIMEOUT", 0.5)
    worker = KVWorker(make_config(controller_api_key=KEY, lmcache_worker_ports=0, p2p_init_ports=0))
    try:
        for port in (worker.worker_port, worker.p2p_port):
            with socket.create_connection((HOST, port), timeout=10) as s:
                t0 = time.monotonic()
                frames = read_frames_until_closed(s)  # closed by the worker, not by our timeout
                assert time.monotonic() - t0 < 9
                assert all(f["code"] == "unauthorized" for f in frames)
    finally:
        worker.close()


def test_command_connections_over_the_cap_are_refused(monkeypatch):
    import lmcache_rs.worker.worker as worker_module

    monkeypatch.setattr(worker_module, "MAX_COMMAND_CONNECTIONS", 3)
    worker = KVWorker(make_config(lmcache_worker_ports=0))
    socks = []
    try:
        for _ in range(3):
            socks.append(socket.create_connection((HOST, worker.worker_port), timeout=10))
        deadline = time.monotonic() + 10
        while len(worker.command_sessions()) < 3:  # all three accepted before the fourth comes
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with socket.create_connection((HOST, worker.worker_port), timeout=10) as s:
            (error,) = read_frames_until_closed(s)
        assert error["code"] == "too_many_connections"
        assert len(worker.command_sessions()) == 3
    finally:
        for s in socks:
            s.close()
        worker.close()
