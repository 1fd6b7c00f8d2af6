"""An ingest and three replicas on a real nats-server (loopback, store in a temp dir).

At every quiet point: each replica has applied the stream's last message, their index digests
are equal and equal to a reference built from what the workers hold, and 10,000 lookups are
answered identically by every replica and by the reference.
Faults: kill -9 of a replica, of the ingest and of nats-server; duplicate publishes."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import msgspec
import zmq

from lmcache_rs import Index, lmcache_chunk_hashes
from lmcache_rs.controller import lmcache_messages as lm
from lmcache_rs.controller.jetstream import decode
from lmcache_rs.controller.oplog import apply_message
from lmcache_rs.wire.session import SessionClosed
from fake_worker import ControllerProcess, FakeWorker, build_request, run_with_workers
from kv_event_publisher import Publisher, removed, stored
from reference_model import ReferenceIndex, chunk_hashes
from test_index_digest import reference_digest

NATS_SERVER = shutil.which("nats-server")
# CI installs nats-server (.ci/run), so there a missing server is a failure, not a skip
if NATS_SERVER is None and os.environ.get("CI"):
    raise RuntimeError("CI is set but nats-server is not installed: .ci/run should have installed it")
pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="no nats-server on this machine (apt-get install -y nats-server)")

CHUNK, SEED = 4, 7
CONFIG = {"chunk_size": CHUNK, "hash_seed": SEED}
LOCATIONS = ["LocalCPUBackend", "LocalDiskBackend"]
LAYOUT = {"inst_a": 1, "inst_tp": 2, "inst_c": 1}
QUIET_TIMEOUT = 60.0
LOOKUPS = 10_000  # answers compared at every quiet point, per replica


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """``nats-server -js`` on a free loopback port; its store survives a kill -9 and restart."""

    def __init__(self, root: Path):
        self.root = root
        self.store = root / "js"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.root / "nats.log", "ab")
        self.proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
                                      str(self.store)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert self.proc.poll() is None, (self.root / "nats.log").read_text()
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None


class Cluster:
    def __init__(self, root: Path, replicas: int = 3, ingest_env: dict | None = None, kv_events: bool = False,
                 lmcache: bool = False):
        self.nats = NatsServer(root)
        args = ["--role", "ingest", "--nats-url", self.nats.url, "--heartbeat-timeout", "30"]
        self.kv_ports = (free_port(), free_port())
        if kv_events:  # an engine publishing vLLM KV events to the ingest
            args += ["--kv-events", json.dumps({"bind": f"tcp://127.0.0.1:{self.kv_ports[0]}",
                                                "replay_endpoint": f"tcp://127.0.0.1:{self.kv_ports[1]}"})]
        self.lmcache_ports = (free_port(), free_port())
        if lmcache:  # an LMCache worker reporting on LMCache's sockets
            args += ["--monitor-ports", json.dumps({"pull": self.lmcache_ports[0], "reply": self.lmcache_ports[1]}),
                     "--none-hash", "0"]
        self.ingest = ControllerProcess(*args, config=CONFIG, env=ingest_env)
        self.replicas = [self.replica() for _ in range(replicas)]

    def replica(self, *args: str) -> ControllerProcess:
        return ControllerProcess("--role", "replica", "--nats-url", self.nats.url, "--none-hash", "0", *args,
                                 config=CONFIG)

    def __enter__(self) -> "Cluster":
        self.nats.start()
        self.ingest.start()
        for r in self.replicas:
            r.start()
        return self

    def __exit__(self, *exc) -> None:
        for proc in [self.ingest, *self.replicas]:
            proc.stop()
            proc._dir.cleanup()
        self.nats.stop()

    def kill9(self, proc: ControllerProcess) -> None:
        assert proc.proc is not None
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait()
        proc.proc = None


async def http(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_request(method, path, json.dumps(body).encode() if body is not None else None))
        return await read_response(reader)
    finally:
        writer.close()


async def http_text(port: int, path: str) -> tuple[int, dict, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_request("GET", path))
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if line)}
        data = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(head[0].split(" ", 2)[1]), headers, data.decode()
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, dict]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if line)}
    data = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, json.loads(data)


async def lookups(port: int, prompts: list[list[int]], batch: int = 200) -> tuple[list[dict], set[int]]:
    """Every prompt's layout_info, pipelined on one connection, and the X-Lmc-Seq values seen."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[dict] = []
    seqs: set[int] = set()
    try:
        for i in range(0, len(prompts), batch):
            part = prompts[i:i + batch]
            writer.write(b"".join(build_request("POST", "/lookup", json.dumps({"tokens": t}).encode()) for t in part))
            for _ in part:
                status, headers, body = await read_response(reader)
                assert status == 200, body
                seqs.add(int(headers["x-lmc-seq"]))
                out.append({k: tuple(v) for k, v in body["layout_info"].items()})
    finally:
        writer.close()
    return out, seqs


async def log_messages(url: str) -> list[list]:
    """Every message's operations, in stream order."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("LMC_OPS")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("LMC_OPS", seq)
            out.append(decode(msg.data)["ops"])
        return out
    finally:
        await nc.close()


async def stream_first(url: str) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info("LMC_OPS")).state.first_seq
    finally:
        await nc.close()


async def stream_last(url: str) -> tuple[int, int]:
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("LMC_OPS")
        return info.state.last_seq, info.state.messages
    finally:
        await nc.close()


def block_hashes(tokens: list[int]) -> list[int]:
    """The engine's block hashes of these tokens (whole blocks), as the publisher stores them."""
    return stored(tokens, CHUNK)["block_hashes"]


def send(fw: FakeWorker, ops: list) -> None:
    """Events as a worker has them: held at once, reported when it is connected (a worker that
    reconnects full-syncs what it holds)."""
    try:
        fw.send_events(ops)
    except SessionClosed:
        pass


class LMCacheWorkerSim:
    """An LMCache worker as the controller sees it: register and heartbeat on the reply
    socket, numbered admit/evict batches on the pull socket."""

    INSTANCE = "lmc-w"

    def __init__(self, pull_port: int, reply_port: int):
        self.ctx = zmq.Context()
        self.req = self.ctx.socket(zmq.REQ)
        self.req.setsockopt(zmq.LINGER, 0)
        self.req.setsockopt(zmq.RCVTIMEO, 10_000)
        self.req.connect(f"tcp://127.0.0.1:{reply_port}")
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(f"tcp://127.0.0.1:{pull_port}")
        self.seq = 0
        self.sent = 0  # messages pushed
        self.held: set[int] = set()

    def start(self) -> None:
        for cls in (lm.RegisterMsg, lm.HeartbeatMsg):  # a heartbeating worker is not probed
            self.req.send(lm.encoder.encode(cls(instance_id=self.INSTANCE, worker_id=0, ip="127.0.0.1", port=1,
                                                peer_init_url=None)))
            assert self.reply()["type"] != "ErrorMsg"

    def reply(self) -> dict:
        return msgspec.msgpack.decode(self.req.recv())

    def resync(self) -> None:
        """As after a controller restart: the next heartbeat registers the worker again, then
        it full-syncs what it holds."""
        self.sent = 0  # pull-socket messages the new controller has seen
        self.req.send(lm.encoder.encode(lm.HeartbeatMsg(instance_id=self.INSTANCE, worker_id=0, ip="127.0.0.1",
                                                        port=1, peer_init_url=None)))
        assert self.reply()["commands"][0]["command_type"] == "full_sync"
        sync_id = f"s{time.monotonic_ns()}"
        keys = sorted(self.held)
        self.req.send(lm.encoder.encode(lm.FullSyncStartMsg(
            instance_id=self.INSTANCE, worker_id=0, location="LocalCPUBackend", sync_id=sync_id,
            total_keys=len(keys), batch_count=1)))
        assert self.reply()["accepted"]
        for msg in (lm.FullSyncBatchMsg(instance_id=self.INSTANCE, worker_id=0, location="LocalCPUBackend",
                                        sync_id=sync_id, batch_id=0, keys=keys),
                    lm.FullSyncEndMsg(instance_id=self.INSTANCE, worker_id=0, location="LocalCPUBackend",
                                      sync_id=sync_id, actual_total_keys=len(keys))):
            self.sent += 1
            self.push.send(lm.encoder.encode(msg))

    def send(self, kind: str, keys: list[int]) -> None:
        op = lm.AdmitOp if kind == "admit" else lm.EvictOp
        operations = [op(k, self.seq + i) for i, k in enumerate(keys)]
        self.seq += len(keys)
        (self.held.update if kind == "admit" else self.held.difference_update)(keys)
        self.sent += 1
        self.push.send(lm.encoder.encode(lm.BatchedKVOperationMsg(
            instance_id=self.INSTANCE, worker_id=0, location="LocalCPUBackend", operations=operations)))

    def expected(self, query: list[int]) -> tuple | None:
        ref = Index(CHUNK, key_space="lmcache_builtin", none_hash=0)
        ref.register_worker(self.INSTANCE, 0)
        ref.apply_batch([("admit", self.INSTANCE, 0, "LocalCPUBackend", sorted(self.held))])
        return ref.lookup(query).get(self.INSTANCE)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


class Workload:
    """Fake workers on the ingest and the reference index of what they hold."""

    def __init__(self, seed: int = 1):
        self.rng = random.Random(seed)
        base = [self.rng.randrange(50000) for _ in range(48)]
        self.prompts = [base[: self.rng.randrange(1, 49)] + [self.rng.randrange(50000) for _ in range(self.rng.randrange(0, 12))]
                        for _ in range(60)]
        self.workers: dict[tuple[str, int], FakeWorker] = {}
        self.engine: Publisher | None = None
        self.lmcache: LMCacheWorkerSim | None = None
        self.lmcache_paused = False  # while the ingest is down (what it would push is not counted)
        self.ingest_http = 0
        self.engine_blocks: set[int] = set()  # engine block hashes the engine holds now

    async def engine_connected(self, ingest_http: int) -> None:
        """PUB drops what it sends before the connection is up: send empty batches until the
        ingest has applied one."""
        assert self.engine is not None
        deadline = time.monotonic() + 30
        while True:
            n = self.engine.publish([]) + 1
            status, _, text = await http_text(ingest_http, "/metrics")
            if f'lmcache_kv_event_next_seq{{instance="pod-e"}} {n:.1f}' in text:
                return
            assert time.monotonic() < deadline, "the engine did not connect"
            await asyncio.sleep(0.05)

    async def start(self, monitor_port: int, kv_ports: tuple[int, int] | None = None, ingest_http: int = 0,
                    lmcache_ports: tuple[int, int] | None = None) -> None:
        self.ingest_http = ingest_http
        if lmcache_ports is not None:
            self.lmcache = LMCacheWorkerSim(*lmcache_ports)
            self.lmcache.start()
        if kv_ports is not None:
            self.engine = Publisher(f"tcp://127.0.0.1:{kv_ports[0]}", f"tcp://127.0.0.1:{kv_ports[1]}",
                                    topic="kv@pod-e@tiny")
            await self.engine_connected(ingest_http)
        for inst, n in LAYOUT.items():
            for w in range(n):
                fw = FakeWorker(inst, w, monitor_port, chunk_size=CHUNK, seed=SEED, world_size=n, reconnect=True)
                assert (await fw.start())["t"] == "welcome"
                self.workers[(inst, w)] = fw

    def step(self) -> None:
        """One batch of events from every worker (and a TP store on both ranks)."""
        rng = self.rng
        for fw in self.workers.values():
            ops = []
            for _ in range(rng.randrange(1, 4)):
                keys = chunk_hashes(rng.choice(self.prompts), CHUNK, SEED)
                if rng.random() < 0.3:
                    ops.append(("evict", rng.choice(LOCATIONS), keys[rng.randrange(len(keys)):]))
                else:
                    ops.append(("admit", rng.choice(LOCATIONS), keys[: rng.randrange(1, len(keys) + 1)]))
            send(fw, ops)
        keys = chunk_hashes(self.rng.choice(self.prompts), CHUNK, SEED)
        for w in (0, 1):
            send(self.workers[("inst_tp", w)], [("admit", LOCATIONS[0], keys)])
        if self.lmcache is not None and not self.lmcache_paused:
            keys = lmcache_chunk_hashes(rng.choice(self.prompts), CHUNK, 0)
            if rng.random() < 0.3:
                self.lmcache.send("evict", keys[rng.randrange(len(keys)):])
            else:
                self.lmcache.send("admit", keys[: rng.randrange(1, len(keys) + 1)])
        if self.engine is not None:
            tokens = rng.choice(self.prompts)
            event = stored(tokens, CHUNK)
            events = [event]
            self.engine_blocks.update(event["block_hashes"])
            if rng.random() < 0.3:
                gone = block_hashes(rng.choice(self.prompts))
                gone = gone[rng.randrange(len(gone) + 1):]
                events.append(removed(gone))
                self.engine_blocks.difference_update(gone)
            self.engine.publish(events)

    async def run(self, steps: int, pause: float = 0.002) -> None:
        for _ in range(steps):
            self.step()
            await asyncio.sleep(pause)

    def reference(self) -> ReferenceIndex:
        ref = ReferenceIndex(CHUNK, SEED)
        for (inst, w), fw in self.workers.items():
            ref.register_worker(inst, w)
            for location, keys in fw.holdings.items():
                ref.admit(inst, w, location, list(keys))
        return ref

    def expected(self, ref: ReferenceIndex, query: list[int]) -> dict:
        """The reference's answer, plus the engine's: its longest run of held blocks."""
        out = ref.lookup(query)
        if self.engine is not None:
            n = 0
            for h in block_hashes(query):
                if h not in self.engine_blocks:
                    break
                n += 1
            if n:
                out["pod-e"] = ("GPU", n * CHUNK)
        if self.lmcache is not None:
            held = self.lmcache.expected(query)
            if held is not None:
                out[self.lmcache.INSTANCE] = held
        return out

    def queries(self, n: int) -> list[list[int]]:
        rng = random.Random(99)
        out = []
        for _ in range(n):
            p = rng.choice(self.prompts)
            out.append(p[: rng.randrange(1, len(p) + 1)] + ([rng.randrange(50000)] if rng.random() < 0.2 else []))
        return out

    async def barrier(self) -> None:
        """Wait until the ingest has applied everything every source sent."""
        await asyncio.gather(*(fw.barrier(timeout=30) for fw in self.workers.values()))
        wanted = []
        if self.engine is not None:
            wanted.append(f'lmcache_kv_event_next_seq{{instance="pod-e"}} {self.engine.seq:.1f}\n')
        if self.lmcache is not None:
            wanted.append(f'pull_socket_message_count{{role="controller"}} {self.lmcache.sent:.1f}\n')
        deadline = time.monotonic() + QUIET_TIMEOUT
        while wanted:
            _, _, text = await http_text(self.ingest_http, "/metrics")
            if all(w in text for w in wanted):
                return
            assert time.monotonic() < deadline, (wanted, text)
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for fw in self.workers.values():
            await fw.close()
        if self.engine is not None:
            self.engine.close()
        if self.lmcache is not None:
            self.lmcache.close()


async def quiet(cluster: Cluster, replicas: list[ControllerProcess] | None = None) -> int:
    """Wait until the ingest has published everything and every replica applied the stream's
    last message; returns that sequence."""
    replicas = cluster.replicas if replicas is None else replicas
    deadline = time.monotonic() + QUIET_TIMEOUT
    stable = 0
    while True:
        _, _, ingest = await http(cluster.ingest.http_port, "GET", "/healthz")
        last, _ = await stream_last(cluster.nats.url)
        states = [(await http(r.http_port, "GET", "/healthz"))[2] for r in replicas]
        if ingest["pending"] == 0 and ingest["last_seq"] == last and all(s["applied_seq"] == last for s in states):
            stable += 1
            if stable == 3:  # nothing moved across three polls
                return last
        else:
            stable = 0
        assert time.monotonic() < deadline, (ingest, last, states)
        await asyncio.sleep(0.05)


async def check(cluster: Cluster, work: Workload, n_lookups: int, replicas: list | None = None) -> int:
    """The quiet-point properties; returns the sequence they hold at."""
    replicas = cluster.replicas if replicas is None else replicas
    await work.barrier()
    last = await quiet(cluster, replicas)
    ref = work.reference()
    states = [(await http(r.http_port, "GET", "/healthz"))[2] for r in replicas]
    for state in states:
        assert state["ready"] and state["applied_seq"] == last and state["broken"] is None, state
        assert state["digests"] == states[0]["digests"]
    assert int(states[0]["digests"]["rs"]) == reference_digest(ref) != 0
    queries = work.queries(n_lookups)
    expected = [work.expected(ref, q) for q in queries]
    if work.engine is not None:  # the engine's blocks are part of the answers
        assert any("pod-e" in e for e in expected) and any("pod-e" not in e for e in expected)
    if work.lmcache is not None:  # and so are the LMCache worker's
        assert any("lmc-w" in e for e in expected)
    for r in replicas:
        answers, seqs = await lookups(r.http_port, queries)
        assert seqs == {last}
        assert answers == expected
    return last


async def resynced(work: Workload, timeout: float = 30) -> None:
    """Wait until every worker has reconnected to a restarted ingest and full-synced again."""
    for fw in work.workers.values():
        deadline = time.monotonic() + timeout
        while fw.report is None or fw.report.closed or fw.sync_count < 2:
            assert time.monotonic() < deadline, f"worker {fw} did not full-sync again"
            await asyncio.sleep(0.05)


def run(coro):
    return run_with_workers(coro)


def test_steady_state_three_replicas_agree_with_the_reference(tmp_path):
    with Cluster(tmp_path, kv_events=True, lmcache=True) as cluster:

        async def main():
            work = Workload()
            await work.start(cluster.ingest.monitor_port, cluster.kv_ports, cluster.ingest.http_port,
                             cluster.lmcache_ports)
            await work.run(60)
            await check(cluster, work, LOOKUPS)
            for path in ("/metrics", "/dashboard.json", "/"):  # the read API works on a replica too
                status, _, text = await http_text(cluster.replicas[0].http_port, path)
                assert status == 200, (path, text[:500])
            assert "lmcache_index_chunks" in (await http_text(cluster.replicas[0].http_port, "/metrics"))[2]
            # more traffic, a late replica started from nothing, another quiet point
            await work.run(30)
            late = cluster.replica("--http-threads", "2")  # lookups on two loops, both with X-Lmc-Seq
            cluster.replicas.append(late)
            late.start()
            await check(cluster, work, LOOKUPS)
            await work.close()

        run(main())


def test_replica_killed_mid_stream_restarts_and_catches_up(tmp_path):
    with Cluster(tmp_path, kv_events=True) as cluster:

        async def main():
            work = Workload(2)
            await work.start(cluster.ingest.monitor_port, cluster.kv_ports, cluster.ingest.http_port)
            await work.run(30)
            victim = cluster.replicas[1]
            cluster.kill9(victim)
            await work.run(30)
            victim.start()
            await work.run(10)
            await check(cluster, work, LOOKUPS)
            await work.close()

        run(main())


def test_ingest_killed_mid_stream_restarts_and_loses_nothing(tmp_path):
    with Cluster(tmp_path, kv_events=True, lmcache=True) as cluster:

        async def main():
            work = Workload(3)
            await work.start(cluster.ingest.monitor_port, cluster.kv_ports, cluster.ingest.http_port,
                             cluster.lmcache_ports)
            await work.run(30)
            first = await check(cluster, work, LOOKUPS)
            http_port, monitor_port = cluster.ingest.http_port, cluster.ingest.monitor_port
            _, _, before = await http(http_port, "GET", "/healthz")
            await work.run(10, pause=0)
            cluster.kill9(cluster.ingest)
            work.lmcache_paused = True
            await work.run(10)  # sent to a dead ingest: the workers resync when it is back
            cluster.ingest.start(http_port, monitor_port)
            assert work.lmcache is not None
            work.lmcache.resync()
            work.lmcache_paused = False
            _, _, state = await http(http_port, "GET", "/healthz")
            assert state["incarnation"] > before["incarnation"]
            await resynced(work)
            await work.run(20)
            assert await check(cluster, work, LOOKUPS) > first
            await work.close()

        run(main())


def test_nats_server_killed_and_restarted_loses_nothing(tmp_path):
    with Cluster(tmp_path) as cluster:

        async def main():
            work = Workload(4)
            await work.start(cluster.ingest.monitor_port)
            await work.run(30)
            first = await check(cluster, work, LOOKUPS)
            await work.run(10)
            cluster.nats.kill9()
            await work.run(20)  # the ingest applies and keeps retrying its publishes
            await asyncio.sleep(3)  # longer than a publish waits for its ack
            cluster.nats.start()
            await work.run(20)
            assert await check(cluster, work, LOOKUPS) > first
            _, _, state = await http(cluster.ingest.http_port, "GET", "/healthz")
            last, messages = await stream_last(cluster.nats.url)
            assert messages == last == state["last_seq"]  # each message stored once, none lost
            assert state["retries"] > 0  # publishes during the outage were retried, each stored once
            await work.close()

        run(main())


def test_duplicate_publishes_are_dropped_by_the_stream(tmp_path):
    with Cluster(tmp_path, replicas=2, ingest_env={"LMCACHE_CONTROLLER_INGEST_RESEND_FRACTION": "0.01"}) as cluster:

        async def main():
            work = Workload(5)
            await work.start(cluster.ingest.monitor_port)
            for _ in range(500):  # one message or more per step
                work.step()
                await asyncio.sleep(0.008)
            await check(cluster, work, LOOKUPS)
            _, _, state = await http(cluster.ingest.http_port, "GET", "/healthz")
            last, messages = await stream_last(cluster.nats.url)
            assert state["resent"] > 0 and state["duplicates"] == state["resent"]
            assert state["published"] == messages == last
            # the log alone rebuilds the replicas' state, and re-applying an overlapping
            # suffix on top of a midway state changes nothing (every operation assigns)
            _, _, replica = await http(cluster.replicas[0].http_port, "GET", "/healthz")
            batches = await log_messages(cluster.nats.url)
            assert len(batches) == last
            full = Index(CHUNK, SEED)
            for ops in batches:
                apply_message(ops, lambda space: full)
            assert str(full.digest()) == replica["digests"]["rs"]
            overlapped = Index(CHUNK, SEED)
            for ops in batches[: last // 2] + batches[last // 4:]:
                apply_message(ops, lambda space: overlapped)
            assert overlapped.digest() == full.digest()
            await work.close()

        run(main())


def test_snapshots_purge_the_stream_and_bootstrap_late_and_restarted_replicas(tmp_path):
    with Cluster(tmp_path, replicas=0) as cluster:
        dirs = [tmp_path / "snap0", tmp_path / "snap1"]
        for d in dirs:
            replica = cluster.replica("--snapshot", str(d), "--snapshot-interval", "0.3")
            cluster.replicas.append(replica)
            replica.start()

        async def main():
            work = Workload(6)
            await work.start(cluster.ingest.monitor_port)
            await work.run(30)
            last = await check(cluster, work, LOOKUPS)

            async def purged_past(seq: int) -> int:
                deadline = time.monotonic() + QUIET_TIMEOUT
                while (first := await stream_first(cluster.nats.url)) <= seq + 1 or first <= 1:
                    assert time.monotonic() < deadline, "the stream was not purged below a snapshot"
                    await asyncio.sleep(0.1)
                return first

            await purged_past(0)
            # a replica killed with a local snapshot the stream has since been purged past
            victim = cluster.replicas[1]
            deadline = time.monotonic() + QUIET_TIMEOUT
            while (await http(victim.http_port, "GET", "/healthz"))[2]["snapshot_seq"] == 0:
                assert time.monotonic() < deadline, "no local snapshot"
                await asyncio.sleep(0.05)
            cluster.kill9(victim)
            old = json.loads((dirs[1] / "manifest.json").read_text())["seq"]
            assert 0 < old <= last
            await work.run(30)
            await work.barrier()
            await quiet(cluster, cluster.replicas[:1])
            await purged_past(old)
            victim.start()
            late = cluster.replica()  # no snapshot of its own
            late.start()
            cluster.replicas.append(late)
            await check(cluster, work, LOOKUPS)
            for r in (victim, late):
                _, _, state = await http(r.http_port, "GET", "/healthz")
                assert state["origin"] == "shared", state
            # kill -9 and restart at once: the local snapshot (at the last message: nothing
            # after it can have been purged) is still followed by the stream
            survivor = cluster.replicas[0]
            deadline = time.monotonic() + QUIET_TIMEOUT
            while (state := (await http(survivor.http_port, "GET", "/healthz"))[2])["snapshot_seq"] != \
                    state["applied_seq"]:
                assert time.monotonic() < deadline, "no local snapshot at the last message"
                await asyncio.sleep(0.05)
            cluster.kill9(survivor)
            survivor.start()
            _, _, state = await http(survivor.http_port, "GET", "/healthz")
            assert state["origin"] == "local", state
            await work.run(10)
            await check(cluster, work, LOOKUPS)
            # the ingest restarted after a purge rebuilds from the shared snapshot and the rest
            await purged_past(1)
            http_port, monitor_port = cluster.ingest.http_port, cluster.ingest.monitor_port
            cluster.kill9(cluster.ingest)
            cluster.ingest.start(http_port, monitor_port)
            assert "rebuilding from the shared snapshot" in cluster.ingest.log()
            await resynced(work)
            await work.run(10)
            await check(cluster, work, LOOKUPS)
            await work.close()

        run(main())


def test_clear_through_a_replica_is_applied_there_when_it_answers(tmp_path):
    with Cluster(tmp_path) as cluster:

        async def main():
            work = Workload(7)
            await work.start(cluster.ingest.monitor_port)
            await work.run(30)
            await check(cluster, work, LOOKUPS)
            queries = work.queries(1_000)
            before, _ = await lookups(cluster.replicas[1].http_port, queries)
            assert any("inst_a" in a for a in before)
            status, headers, body = await http(cluster.replicas[1].http_port, "POST", "/clear",
                                               {"instance_id": "inst_a"})
            assert status == 200 and body["num_tokens"] > 0, body
            assert not any(work.workers[("inst_a", 0)].holdings.values())
            # no waiting: the answer came after this replica applied the worker's evictions
            ref = work.reference()
            answers, _ = await lookups(cluster.replicas[1].http_port, queries)
            assert answers == [work.expected(ref, q) for q in queries]
            assert not any("inst_a" in a for a in answers)
            # the others show the same at the same sequence
            await check(cluster, work, LOOKUPS)
            # a request the workers refuse is answered as the ingest answers it
            status, _, body = await http(cluster.replicas[2].http_port, "POST", "/clear", {"instance_id": "nope"})
            assert status == 404 and "error" in body
            status, _, body = await http(cluster.replicas[2].http_port, "POST", "/query_worker_info",
                                         {"instance_id": "inst_tp"})
            assert status == 200, body
            await work.close()

        run(main())


def test_role_settings_are_checked():
    from lmcache_rs.controller.settings import settings_from_args

    with pytest.raises(SystemExit):
        settings_from_args(["--role", "leader"])
    with pytest.raises(ValueError, match="ingest rebuilds"):
        settings_from_args(["--role", "ingest", "--snapshot", "/tmp/x"])
    assert settings_from_args(["--role", "replica", "--snapshot", "/tmp/x"]).role == "replica"
    assert settings_from_args([]).role == "single"


def test_a_full_sync_larger_than_a_message_reaches_every_replica(tmp_path):
    with Cluster(tmp_path, replicas=2) as cluster:

        async def main():
            work = Workload(8)
            big = FakeWorker("inst_big", 0, cluster.ingest.monitor_port, chunk_size=CHUNK, seed=SEED)
            rng = random.Random(8)
            big.holdings["LocalCPUBackend"] = {rng.getrandbits(64) for _ in range(300_000)}  # 2.4 MB of keys
            assert (await big.start())["t"] == "welcome"
            work.workers[("inst_big", 0)] = big
            await check(cluster, work, 500)  # the plain-Python reference is slow at 300k keys
            await work.close()

        run(main())
