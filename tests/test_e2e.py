"""End to end with real processes on loopback: one lmcache_controller, two single-worker
instances (inst-a, inst-b) and one instance with two tensor-parallel workers (inst-tp).

Each worker is ``python -m lmcache_rs.worker --config <yaml> --worker-id N --preload <jsonl>``
holding synthetic KV (deterministic from the tokens, see worker/synthetic.py), so the tests
also pull chunks over P2P from the processes and compare them bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from lmcache_rs.wire.framing import pack_u64s, unpack_u64s
from lmcache_rs.worker import synthetic_kv
from lmcache_rs.worker.p2p import FramedSocket

from reference_model import chunk_hashes

CS = 4
SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8)
CHUNK_BYTES = 2 * 2 * 2 * 8 * 2 * CS
HEARTBEAT_TIMEOUT = 1.5
CPU = "LocalCPUBackend"

# Prompts (token lists); chunk size 4.
PA = list(range(1000, 1010))  # inst-a: 10 tokens
SHARED = list(range(2000, 2012))  # inst-a holds all 12, inst-b the first 8
PB = list(range(3000, 3008))  # inst-b
PB_PINNED = list(range(3100, 3108))  # inst-b, pinned before memory pressure
PT = list(range(4000, 4012))  # both inst-tp workers
PT0 = list(range(4100, 4108))  # inst-tp worker 0 only
Q = [list(range(5000 + 100 * i, 5016 + 100 * i)) for i in range(3)]  # inst-a: 3 x 16 tokens
PM = list(range(6000, 6010))  # inst-a, moved to inst-b
PC = list(range(7000, 7020))  # inst-a, compressed

PRELOAD = {
    ("inst-a", 0): [PA, SHARED, PM, PC] + Q,
    ("inst-b", 0): [SHARED[:8], PB, PB_PINNED],
    ("inst-tp", 0): [PT, PT0],
    ("inst-tp", 1): [PT],
}
POOL_SLOTS = {"inst-a": 64, "inst-b": 12, "inst-tp": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, tmp):
        self.tmp = tmp
        self.http_port, self.monitor_port = free_port(), free_port()
        self.procs: dict = {}
        self.logs: dict = {}
        self.killed: set = set()  # processes a test killed on purpose
        env = {**os.environ, "PYTHONHASHSEED": "123"}
        self.controller_argv = [
            sys.executable, "-m", "lmcache_rs.controller", "--host", "127.0.0.1", "--port", str(self.http_port),
            "--monitor-port", str(self.monitor_port), "--chunk-size", str(CS), "--heartbeat-interval", "0.2",
            "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT), "--log-level", "WARNING"]
        self._spawn("controller", self.controller_argv, env)
        for (instance, rank), prompts in PRELOAD.items():
            config = tmp / f"{instance}.yaml"
            config.write_text(
                "\n".join([
                    f"chunk_size: {CS}",
                    f"max_local_cpu_size: {POOL_SLOTS[instance] * CHUNK_BYTES / 1024**3!r}",
                    "enable_controller: true",
                    f"lmcache_instance_id: {instance}",
                    f"world_size: {sum(1 for inst, _ in PRELOAD if inst == instance)}",
                    f"controller_pull_url: 127.0.0.1:{self.monitor_port}",
                    "lmcache_worker_host: 127.0.0.1",
                    "lmcache_worker_ports: 0",
                    "p2p_host: 127.0.0.1",
                    "p2p_init_ports: 0",
                    "num_layers: 2", "num_kv_heads: 2", "head_dim: 8",
                    "report_interval: 0.005",
                ]) + "\n"
            )
            preload = tmp / f"{instance}-{rank}.jsonl"
            preload.write_text("".join(json.dumps(p) + "\n" for p in prompts))
            self._spawn(
                (instance, rank),
                [sys.executable, "-m", "lmcache_rs.worker", "--config", str(config), "--worker-id", str(rank),
                 "--preload", str(preload), "--log-level", "WARNING"],
                env,
            )

    def restart_controller(self):
        proc = self.procs["controller"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        self.logs.pop("controller").close()
        self._spawn("controller", self.controller_argv, {**os.environ, "PYTHONHASHSEED": "123"})

    def _spawn(self, name, argv, env):
        label = name if isinstance(name, str) else f"{name[0]}-{name[1]}"
        self.logs[name] = open(self.tmp / f"{label}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=self.logs[name], stderr=subprocess.STDOUT)

    def log(self, name) -> str:
        label = name if isinstance(name, str) else f"{name[0]}-{name[1]}"
        return (self.tmp / f"{label}.log").read_text(errors="replace")

    def post(self, path, body, expect=200):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, data = response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                status, data = exc.code, exc.read()
        assert status == expect, f"{path} {body}: {status} {data!r}"
        return json.loads(data)

    def lookup(self, tokens) -> dict:
        answer = self.post("/lookup", {"tokens": tokens})
        assert answer["layout_info"] == {k: v for k, v in answer.items() if k not in ("event_id", "layout_info")}
        return answer["layout_info"]

    def detail(self, tokens) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/lookup?detail=true", data=json.dumps({"tokens": tokens}).encode()
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["detail"]

    def wait_for(self, check, what, timeout=15.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in self.killed:
                    pytest.fail(f"{name} exited with {proc.returncode}:\n{self.log(name)[-2000:]}")
            try:
                last = check()
                if last:
                    return last
            except (OSError, AssertionError) as exc:
                last = exc
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}; last: {last!r}")

    def p2p_address(self, instance, rank=0):
        infos = self.post("/query_worker_info", {"instance_id": instance, "worker_ids": [rank]})["worker_infos"]
        host, port = infos[0]["distributed_url"].rsplit(":", 1)
        return host, int(port)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        for handle in self.logs.values():
            handle.close()
        return codes


def pull(address, tokens) -> torch.Tensor:
    """Fetch the chunks of ``tokens`` from a worker's P2P port; the KV as one tensor."""
    keys = chunk_hashes(tokens, CS)
    parts = []
    with socket.create_connection(address, timeout=10) as sock:
        framed = FramedSocket(sock, 1 << 24)
        framed.send({"t": "get", "id": 1, "keys": pack_u64s(keys)})
        while True:
            message = framed.read_frame()
            if message["t"] == "end":
                assert list(unpack_u64s(message["missing"])) == []
                break
            data = bytearray(message["nbytes"])
            assert framed.read_exact(memoryview(data)) == len(data)
            parts.append(torch.frombuffer(data, dtype=torch.float16).view(message["shape"]))
    return torch.cat(parts, dim=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("e2e"))
    try:
        for (instance, _rank), prompts in PRELOAD.items():
            for prompt in prompts:
                c.wait_for(lambda p=prompt, i=instance: i in c.lookup(p) or (i == "inst-tp" and p == PT0),
                           f"{instance} to report its preload", timeout=60)
        # both tensor-parallel ranks registered (one alone would already match PT)
        c.wait_for(lambda: {w: held.get(CPU) for w, held in c.detail(PT)["inst-tp"]["workers"].items()}
                   == {"0": 12, "1": 12}, "both inst-tp ranks", timeout=60)
        c.wait_for(lambda: c.detail(PT0)["inst-tp"]["workers"].get("0", {}).get(CPU) == 8, "inst-tp rank 0")
        yield c
    finally:
        codes = c.stop()
    assert all(code == 0 for name, code in codes.items() if name not in c.killed), codes


def test_lookup_is_exact(cluster):
    assert cluster.lookup(PA) == {"inst-a": [CPU, 10]}
    assert cluster.lookup(PA + [1, 2, 3]) == {"inst-a": [CPU, 8]}  # the partial chunk differs
    assert cluster.lookup(SHARED) == {"inst-a": [CPU, 12], "inst-b": [CPU, 8]}
    assert cluster.lookup(PT) == {"inst-tp": [CPU, 12]}  # both ranks hold it
    assert cluster.lookup(PT0) == {}  # only rank 0 holds it: the instance does not match
    assert cluster.lookup([1, 2, 3, 4, 5]) == {}
    detail = cluster.detail(PT0)["inst-tp"]
    assert detail["workers"]["0"][CPU] == 8 and detail["matched_prefix_length"] == 0


def test_kv_in_the_processes_is_bit_exact(cluster):
    assert torch.equal(pull(cluster.p2p_address("inst-a"), PA), synthetic_kv(PA, **SHAPE))
    assert torch.equal(pull(cluster.p2p_address("inst-tp", 1), PT), synthetic_kv(PT, **SHAPE, salt=1))


def test_pin_and_eviction_under_memory_pressure(cluster):
    assert cluster.post("/pin", {"instance_id": "inst-b", "tokens": PB_PINNED})["num_tokens"] == 8
    # copy 12 chunks into inst-b's 12-slot pool (6 used, 2 of them pinned): it must evict
    for q in Q:
        event = cluster.post("/move", {"old_position": ["inst-a", CPU], "new_position": ["inst-b", CPU],
                                       "tokens": q, "copy": True})
        cluster.wait_for(lambda e=event["event_id"]: cluster.post("/check_finish", {"event_id": e})["status"] == "completed",
                         "the copy to finish")
    cluster.wait_for(lambda: cluster.lookup(Q[2]).get("inst-b") == [CPU, 16], "the copied prompt in inst-b")
    cluster.wait_for(lambda: "inst-b" not in cluster.lookup(PB), "inst-b's old prompt evicted")
    assert cluster.lookup(PB_PINNED) == {"inst-b": [CPU, 8]}  # pinned: kept
    assert cluster.lookup(Q[2])["inst-a"] == [CPU, 16]  # a copy leaves the source alone
    assert torch.equal(pull(cluster.p2p_address("inst-b"), Q[2]), synthetic_kv(Q[2], **SHAPE))
    assert cluster.post("/unpin", {"instance_id": "inst-b", "tokens": PB_PINNED})["num_tokens"] == 8


def test_move_between_instances(cluster):
    event = cluster.post("/move", {"old_position": ["inst-a", CPU], "new_position": ["inst-b", CPU], "tokens": PM})
    assert event["num_tokens"] == 10
    cluster.wait_for(lambda: cluster.post("/check_finish", {"event_id": event["event_id"]})["status"] == "completed",
                     "the move to finish")
    cluster.wait_for(lambda: cluster.lookup(PM) == {"inst-b": [CPU, 10]}, "the prompt to be in inst-b only")
    assert torch.equal(pull(cluster.p2p_address("inst-b"), PM), synthetic_kv(PM, **SHAPE))
    # instances of different tensor-parallel sizes cannot swap chunks
    cluster.post("/move", {"old_position": ["inst-a", CPU], "new_position": ["inst-tp", CPU], "tokens": PA}, expect=400)


def test_compress_and_decompress(cluster):
    def cpu_bytes():
        info = cluster.post("/query_worker_info", {"instance_id": "inst-a"})["worker_infos"][0]
        return info["locations"][CPU]["bytes"]

    before = cpu_bytes()
    answer = cluster.post("/compress", {"instance_id": "inst-a", "tokens": PC, "method": "zlib", "location": CPU})
    assert answer["num_tokens"] == 20
    assert cpu_bytes() < before
    assert cluster.lookup(PC) == {"inst-a": [CPU, 20]}
    assert torch.equal(pull(cluster.p2p_address("inst-a"), PC), synthetic_kv(PC, **SHAPE))  # still exact
    cluster.post("/decompress", {"instance_id": "inst-a", "tokens": PC, "method": "zlib", "location": CPU})
    assert cpu_bytes() == before
    # arguments the workers refuse are the request's fault: 400, not 502
    bad = cluster.post("/compress", {"instance_id": "inst-a", "tokens": PC, "method": "lzma", "location": CPU},
                       expect=400)
    assert "unknown compression method" in bad["error"]
    bad = cluster.post("/pin", {"instance_id": "inst-a", "tokens": PC, "location": "GPU"}, expect=400)
    assert "unknown location 'GPU'" in bad["error"]


def test_health_and_clear(cluster):
    assert cluster.post("/health", {"instance_id": "inst-tp"})["error_codes"] == {"0": 0, "1": 0}
    cluster.post("/clear", {"instance_id": "inst-b", "location": "Bogus"}, expect=400)
    cleared = cluster.post("/clear", {"instance_id": "inst-b", "location": CPU})
    assert cleared["num_tokens"] > 0
    # visible when /clear returns: the controller waited for the workers' eviction reports
    assert cluster.lookup(SHARED) == {"inst-a": [CPU, 12]}
    assert cluster.lookup(PM) == {}
    info = cluster.post("/query_worker_info", {"instance_id": "inst-b"})["worker_infos"][0]
    assert info["locations"][CPU]["chunks"] == 0


def test_controller_restart_workers_come_back_with_a_full_sync(cluster):
    prompts = [PA, SHARED, PT, PC, Q[0]]
    before = [cluster.lookup(p) for p in prompts]
    assert all(before)
    cluster.restart_controller()
    for prompt, expected in zip(prompts, before):
        cluster.wait_for(lambda p=prompt, e=expected: cluster.lookup(p) == e, "the workers to resync", timeout=20)
    cluster.wait_for(lambda: set(cluster.detail(PT)["inst-tp"]["workers"]) == {"0", "1"}, "both inst-tp ranks")


def test_killed_worker_disappears_within_the_heartbeat_timeout(cluster):
    proc = cluster.procs[("inst-tp", 1)]
    cluster.killed.add(("inst-tp", 1))
    killed_at = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # rank 1's connection went with it: the instance stops matching at once ...
    cluster.wait_for(lambda: cluster.lookup(PT) == {}, "inst-tp to stop matching", timeout=10)
    assert "1" not in cluster.detail(PT)["inst-tp"]["workers"] and cluster.lookup(PT0) == {}

    def rank_1_known():
        infos = cluster.post("/query_worker_info", {"instance_id": "inst-tp", "worker_ids": None})["worker_infos"]
        return 1 in [info["worker_id"] for info in infos]

    # ... and once rank 1's record expires, rank 0 alone is still not the instance: nothing matches
    cluster.wait_for(lambda: not rank_1_known(), "rank 1 to expire", timeout=HEARTBEAT_TIMEOUT + 5)
    assert cluster.lookup(PT0) == {} and cluster.lookup(PT) == {}
    # the single worker of inst-a goes the same way
    proc = cluster.procs[("inst-a", 0)]
    cluster.killed.add(("inst-a", 0))
    killed_at = time.monotonic()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cluster.wait_for(lambda: "inst-a" not in cluster.lookup(PA), "inst-a to disappear", timeout=10)
    assert time.monotonic() - killed_at < HEARTBEAT_TIMEOUT + 2.0
