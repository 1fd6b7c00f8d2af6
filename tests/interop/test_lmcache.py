"""Real LMCache engines (LMCache 0.5.6 on CPU, from the interop venv) report to our controller.

Each test starts ``lmcache_controller`` (this venv) with LMCache's sockets on free loopback
ports and one or more real LMCache engines (tools/lmcache_engine.py in the interop
venv), which register, report admits and evictions, heartbeat and full-sync exactly as they
do inside vLLM. The oracle for every answer is the engine itself: its own chunk keys and its
own ``lookup`` of the same tokens.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from lmcache_rs import lmcache_chunk_hashes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_worker import ControllerProcess  # noqa: E402
from lmcache_engines import SEED, Engine, free_ports, require_interop_venv, wait_for  # noqa: E402

CHUNK = 16

require_interop_venv()


class Setup:
    def __init__(self):
        self.pull, self.reply, self.heartbeat = free_ports(3)
        self.controller: ControllerProcess | None = None
        self.controllers: list[ControllerProcess] = []
        self.engines: list[Engine] = []

    def start_controller(self, *extra: str) -> ControllerProcess:
        ports = json.dumps({"pull": self.pull, "reply": self.reply, "heartbeat": self.heartbeat})
        ctl = ControllerProcess("--monitor-ports", ports, "--worker-host-override", "127.0.0.1",
                                "--chunk-size", str(CHUNK), "--lmcache-worker-timeout", "4",
                                "--lmcache-probe-interval", "0.5", *extra, env={"PYTHONHASHSEED": SEED})
        self.controllers.append(ctl)
        ctl.start()
        self.controller = ctl
        return ctl

    def engine(self, instance_id: str, **kw) -> Engine:
        (port,) = free_ports(1)
        e = Engine(instance_id, self.pull, self.reply, port, chunk_size=CHUNK, **kw)
        self.engines.append(e)
        return e

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        assert self.controller is not None
        req = urllib.request.Request(f"http://127.0.0.1:{self.controller.http_port}{path}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def lookup(self, tokens: list[int]) -> dict:
        status, body = self.post("/lookup", {"tokens": tokens})
        assert status == 200, body
        return body["layout_info"]

    def close(self) -> None:
        for e in self.engines:
            e.stop()
        for ctl in self.controllers:
            ctl.__exit__(None, None, None)


@pytest.fixture
def setup():
    s = Setup()
    yield s
    if s.controller is not None and s.controller.proc is not None:
        print(s.controller.log()[-4000:])
    s.close()


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1, 128000) for _ in range(2 * CHUNK)]
    out = []
    for i in range(n):
        tail = [rng.randrange(1, 128000) for _ in range(rng.randrange(1, 5 * CHUNK))]
        out.append((shared if i % 2 else []) + tail)
    return out


@pytest.mark.parametrize("vllm", [True, False], ids=["with-vllm", "without-vllm"])
def test_reports_lookup_and_key_space(setup, vllm):
    """Stores show in /lookup with the engine's own prefix lengths, in both NONE_HASH modes."""
    none_hash = [] if vllm else ["--none-hash", "0"]
    setup.start_controller(*none_hash)
    engine = setup.engine("lmc-a", vllm=vllm)
    assert (engine.none_hash != 0) == vllm
    work = prompts(8, seed=1)
    for tokens in work:
        assert engine.ask("keys", tokens=tokens)["keys"] == lmcache_chunk_hashes(tokens, CHUNK, engine.none_hash)
        engine.store(tokens)
    for tokens in work:
        expected = engine.hit(tokens)
        assert expected == len(tokens)  # nothing evicted yet; partial chunks are saved
        wait_for(lambda: setup.lookup(tokens) == {"lmc-a": ["LocalCPUBackend", expected]}, 30, "the admits")
    # a prefix the engine never saw as a whole still matches chunk by chunk
    probe = work[1][: 2 * CHUNK] + [7, 7, 7]
    assert setup.lookup(probe) == {"lmc-a": ["LocalCPUBackend", 2 * CHUNK]}
    assert setup.lookup([5] * 40) == {}
    assert "decode_errors" not in setup.controller.log()


def test_evictions_clear_and_p2p_reach_the_engine(setup):
    """Evictions under memory pressure stay exact; /clear goes to the engine and empties it."""
    setup.start_controller()
    engine = setup.engine("lmc-a", max_cpu_gb=0.002)  # a few dozen chunks: stores evict
    work = prompts(40, seed=2)
    for tokens in work:
        engine.store(tokens)
    hits = [engine.hit(tokens) for tokens in work]
    assert 0 in hits or min(hits) < max(len(t) for t in work), "the engine evicted nothing; the test needs pressure"

    def exact():
        for tokens, hit in zip(work, hits):
            answer = setup.lookup(tokens).get("lmc-a")
            if (answer[1] if answer else 0) != hit:
                return False
        return True

    wait_for(exact, 30, "answers equal to the engine's own lookups")
    status, body = setup.post("/clear", {"instance_id": "lmc-a", "location": "LocalCPUBackend"})
    assert status == 200, body
    assert body["num_tokens"] > 0
    assert all(engine.hit(tokens) == 0 for tokens in work)
    wait_for(lambda: all(setup.lookup(tokens) == {} for tokens in work), 30, "the clear's evictions")
    status, body = setup.post("/health", {"instance_id": "lmc-a"})
    assert status == 200 and body["error_codes"] == {"0": 0}
    status, body = setup.post("/query_worker_info", {"instance_id": "all"})
    assert status == 200 and [w["instance_id"] for w in body["worker_infos"]] == ["lmc-a"]


def test_pin_compress_and_query_instance_reach_the_engine(setup):
    """/pin, /compress, /decompress and /query_instance for an LMCache worker: each command goes
    to the engine's own worker socket and its answer comes back."""
    setup.start_controller()
    engine = setup.engine("lmc-a")
    work = prompts(4, seed=5)
    for tokens in work:
        engine.store(tokens)
    wait_for(lambda: setup.lookup(work[0]) == {"lmc-a": ["LocalCPUBackend", len(work[0])]}, 30, "the admits")
    # pinning is the engine's own lookup with pin=True: it answers how many tokens it pinned
    status, body = setup.post("/pin", {"instance_id": "lmc-a", "location": "LocalCPUBackend",
                                       "tokens": work[0]})
    assert status == 200, body
    assert body["num_tokens"] == engine.hit(work[0]) == len(work[0])
    status, body = setup.post("/pin", {"instance_id": "lmc-a", "location": "LocalCPUBackend",
                                       "tokens": [5] * 40})
    assert status == 200 and body["num_tokens"] == 0, body
    # LMCache's compress knows only "cachegen" (CUDA); any other method is the engine's 0
    for path in ("/compress", "/decompress"):
        status, body = setup.post(path, {"instance_id": "lmc-a", "location": "LocalCPUBackend",
                                         "method": "no-such-method", "tokens": work[1]})
        assert status == 200 and body["num_tokens"] == 0, (path, body)
    # the engine's answers are unchanged by all of that
    assert setup.lookup(work[1]) == {"lmc-a": ["LocalCPUBackend", len(work[1])]}
    status, body = setup.post("/query_worker_info", {"instance_id": "lmc-a"})
    assert status == 200, body
    ip = body["worker_infos"][0]["ip"]
    status, body = setup.post("/query_instance", {"ip": ip})
    assert status == 200 and body["res"] == "lmc-a", body
    status, body = setup.post("/query_instance", {"ip": "192.0.2.1"})
    assert status == 404, body


def test_engine_without_heartbeats_is_found_dead_by_failed_commands(setup):
    """With heartbeats off, the controller probes the worker's command socket; a worker that
    stops answering is removed with its entries after a few failures in a row."""
    setup.start_controller()  # probes every 0.5 s; 3 failures in a row (the default) remove a worker
    quiet = setup.engine("lmc-quiet", heartbeat=None)
    alive = setup.engine("lmc-alive", heartbeat=None)
    work = prompts(2, seed=6)
    quiet.store(work[0])
    alive.store(work[0])
    wait_for(lambda: setup.lookup(work[0]).keys() == {"lmc-quiet", "lmc-alive"}, 30, "both instances")
    quiet.kill()
    wait_for(lambda: "lmc-quiet" not in setup.lookup(work[0]), 60, "the silent engine's entries to go")
    assert setup.lookup(work[0]) == {"lmc-alive": ["LocalCPUBackend", len(work[0])]}
    status, body = setup.post("/query_worker_info", {"instance_id": "all"})
    assert status == 200 and [w["instance_id"] for w in body["worker_infos"]] == ["lmc-alive"], body
    assert "LMCache worker lmc-quiet/0 did not answer" in setup.controller.log()


def test_kill_engine_then_restart_controller(setup):
    """kill -9 of an engine removes its entries; a restarted controller gets the survivors
    back by heartbeat and full sync."""
    ctl = setup.start_controller()
    a = setup.engine("lmc-a")
    b = setup.engine("lmc-b")
    work = prompts(6, seed=3)
    for tokens in work:
        a.store(tokens)
    b.store(work[0])
    wait_for(lambda: setup.lookup(work[0]).keys() == {"lmc-a", "lmc-b"}, 30, "both instances")
    a.kill()
    wait_for(lambda: "lmc-a" not in setup.lookup(work[0]), 30, "the dead engine's entries to go")
    assert setup.lookup(work[0]) == {"lmc-b": ["LocalCPUBackend", len(work[0])]}

    ctl.stop()
    setup.start_controller()
    assert setup.lookup(work[0]) == {}
    # the engine heartbeats, is re-registered, is asked for a full sync and sends what it holds
    wait_for(lambda: setup.lookup(work[0]) == {"lmc-b": ["LocalCPUBackend", len(work[0])]}, 90, "the full sync")
    log = setup.controller.log()
    assert "re-registered by heartbeat" in log and "full sync" in log


def test_garbage_on_lmcache_sockets_changes_nothing(setup):
    """Malformed frames on the pull and reply sockets are counted and dropped; the loops go on."""
    import zmq

    setup.start_controller()
    engine = setup.engine("lmc-a")
    tokens = prompts(1, seed=4)[0]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{setup.pull}")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{setup.reply}")
    garbage = [b"", b"\xc1", b"{not json", b"\x81\xa4type\xa7Unknown",
               b'{"type": "BatchedKVOperationMsg", "instance_id": "lmc-a", "worker_id": 0, "location": "x", '
               b'"operations": [{"op_type": "boom", "key": 1, "seq_num": 0}]}',
               b'{"type": "BatchedKVOperationMsg", "instance_id": "ghost", "worker_id": 0, "location": "x", '
               b'"operations": [{"op_type": "admit", "key": 1, "seq_num": 0}]}']
    for frame in garbage:
        push.send(frame)
        dealer.send_multipart([b"", frame])
        assert b"ErrorMsg" in dealer.recv_multipart()[-1]
    push.close(0)
    dealer.close(0)
    ctx.term()
    engine.store(tokens)
    wait_for(lambda: setup.lookup(tokens) == {"lmc-a": ["LocalCPUBackend", len(tokens)]}, 30, "the store")
    body = urllib.request.urlopen(f"http://127.0.0.1:{setup.controller.http_port}/metrics", timeout=10).read().decode()
    assert 'lmcache_lmcache_messages_total{kind="decode_errors"}' in body
    assert setup.lookup([1, 2, 3]) == {}


@pytest.mark.parametrize("none_hash", ["auto", "0"], ids=["right-none-hash", "wrong-none-hash"])
def test_key_space_mismatch_is_reported(setup, none_hash):
    """An engine inside vLLM reports keys from hash('123'); a controller given --none-hash 0
    never matches them and says so; one given auto confirms its settings and says nothing."""
    setup.start_controller("--none-hash", none_hash, "--lmcache-key-check-lookups", "3")
    engine = setup.engine("lmc-a")
    rng = random.Random(6)
    work = [[rng.randrange(1, 128000) for _ in range(3 * CHUNK)] for _ in range(4)]
    for tokens in work:
        engine.store(tokens)
    metrics = f"http://127.0.0.1:{setup.controller.http_port}/metrics"
    wait_for(lambda: "lmcache_index_holdings 0.0\n" not in urllib.request.urlopen(metrics, timeout=10).read().decode(),
             30, "the admits")
    verdicts = ("LMCache key space confirmed", "LMCache key space: 3 lookups")

    def verdict():
        setup.lookup(work[0])
        return any(v in setup.controller.log() for v in verdicts)

    wait_for(verdict, 60, "the key-space check's verdict")
    log = setup.controller.log()
    body = urllib.request.urlopen(metrics, timeout=10).read().decode()
    if none_hash == "auto":
        assert verdicts[0] in log and verdicts[1] not in log
        assert 'lmcache_lmcache_key_space{state="matched"} 1.0\n' in body
    else:
        assert verdicts[1] in log and "PYTHONHASHSEED" in log and verdicts[0] not in log
        assert 'lmcache_lmcache_key_space{state="mismatch"} 1.0\n' in body


def test_make_demo_lmcache_runs_the_spec_flow_on_its_ports():
    """tools/demo_lmcache.py (``make demo-lmcache``) on the spec's fixed ports: it must end
    with the spec's lookup answering the 12 tokens the LMCache engine stored."""
    from lmcache_rs.demo import port_free

    busy = [p for p in (9000, 9001, 8300, 8400, 8001) if not port_free(p)]
    if busy and not os.environ.get("CI"):
        pytest.skip(f"the demo's ports {busy} are in use here")
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, str(repo / "tools" / "demo_lmcache.py")], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '"lmcache_default_instance": ["LocalCPUBackend", 12]' in run.stdout
