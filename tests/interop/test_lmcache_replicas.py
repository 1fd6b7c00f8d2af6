"""Real LMCache engines (LMCache 0.5.6 on CPU, from the interop venv) report to an ingest;
two replicas follow its log on a real nats-server (loopback, store in a temp dir).

The oracle is the engines themselves: once both replicas have applied the stream's last
message, each one's /lookup of every stored prompt equals the engines' own lookups, and the
two replicas answer identically at the same X-Lmc-Seq. A /clear sent to one replica goes to
the ingest, reaches the engine, and both replicas show it.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_worker import ControllerProcess  # noqa: E402
from lmcache_engines import SEED, Engine, free_ports, require_interop_venv, wait_for  # noqa: E402

CHUNK = 16
LOCATION = "LocalCPUBackend"

require_interop_venv()
from test_replicas import NATS_SERVER, NatsServer, stream_last  # noqa: E402

if NATS_SERVER is None:  # test_replicas raised at import under CI
    pytest.skip("no nats-server on this machine (apt-get install -y nats-server)", allow_module_level=True)


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"{}")


def lookup(port: int, tokens: list[int]) -> tuple[dict, int]:
    """One replica's layout_info for these tokens and the sequence it reflects."""
    status, headers, body = request(port, "POST", "/lookup", {"tokens": tokens})
    assert status == 200, body
    return body["layout_info"], int(headers["x-lmc-seq"])


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1, 128000) for _ in range(2 * CHUNK)]
    out = []
    for i in range(n):
        tail = [rng.randrange(1, 128000) for _ in range(rng.randrange(1, 4 * CHUNK))]
        out.append((shared if i % 2 else []) + tail)
    return out


class Cluster:
    def __init__(self, root: Path):
        self.nats = NatsServer(root)
        self.pull, self.reply, self.heartbeat = free_ports(3)
        env = {"PYTHONHASHSEED": SEED}  # the engines' NONE_HASH: every controller resolves it alike
        ports = json.dumps({"pull": self.pull, "reply": self.reply, "heartbeat": self.heartbeat})
        self.ingest = ControllerProcess("--role", "ingest", "--nats-url", self.nats.url, "--monitor-ports", ports,
                                        "--worker-host-override", "127.0.0.1", "--chunk-size", str(CHUNK),
                                        "--lmcache-worker-timeout", "30", "--lmcache-probe-interval", "0.5", env=env)
        self.replicas = [ControllerProcess("--role", "replica", "--nats-url", self.nats.url,
                                           "--chunk-size", str(CHUNK), env=env) for _ in range(2)]
        self.engines: list[Engine] = []

    def start(self) -> None:
        self.nats.start()
        self.ingest.start()
        for r in self.replicas:
            r.start()

    def engine(self, instance_id: str) -> Engine:
        (port,) = free_ports(1)
        e = Engine(instance_id, self.pull, self.reply, port, chunk_size=CHUNK)
        self.engines.append(e)
        return e

    def quiet(self, timeout: float = 60.0) -> int:
        """Wait until the ingest has published everything and both replicas are ready and have
        applied the stream's last message, unchanged across three polls; returns that sequence."""
        deadline = time.monotonic() + timeout
        stable = 0
        while True:
            _, _, ingest = request(self.ingest.http_port, "GET", "/healthz")
            last, _ = asyncio.run(stream_last(self.nats.url))
            states = [request(r.http_port, "GET", "/healthz") for r in self.replicas]
            if ingest["pending"] == 0 and ingest["last_seq"] == last and \
                    all(code == 200 and s["ready"] and s["applied_seq"] == last for code, _, s in states):
                stable += 1
                if stable == 3:
                    assert all(s["digests"] == states[0][2]["digests"] for _, _, s in states), states
                    return last
            else:
                stable = 0
            assert time.monotonic() < deadline, (ingest, last, states)
            time.sleep(0.1)

    def close(self) -> None:
        for e in self.engines:
            e.stop()
        for proc in [self.ingest, *self.replicas]:
            proc.stop()
        self.nats.stop()
        for proc in [self.ingest, *self.replicas]:
            proc._dir.cleanup()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        for name, proc in [("ingest", c.ingest), ("replica 0", c.replicas[0]), ("replica 1", c.replicas[1])]:
            print(f"--- {name}\n{proc.log()[-3000:]}")
        c.close()


def test_replicas_answer_as_the_engines_and_show_a_forwarded_clear(cluster):
    a = cluster.engine("lmc-a")
    b = cluster.engine("lmc-b")
    work = prompts(6, seed=11)
    for tokens in work:
        a.store(tokens)
    for tokens in work[::2]:
        b.store(tokens)

    def expected(tokens: list[int]) -> dict:
        """The engines' own lookups, as layout_info."""
        out = {}
        for e in (a, b):
            hit = e.hit(tokens)
            if hit:
                out[e.instance_id] = [LOCATION, hit]
        return out

    want = [expected(tokens) for tokens in work]
    assert all(w.get("lmc-a") == [LOCATION, len(t)] for w, t in zip(want, work))  # nothing evicted
    assert sum("lmc-b" in w for w in want) == len(work[::2])

    def answers(port: int) -> tuple[list[dict], set[int]]:
        got = [lookup(port, tokens) for tokens in work]
        return [g[0] for g in got], {g[1] for g in got}

    def agree(want: list[dict], what: str) -> None:
        """Every replica answers ``want`` and, at the next quiet point, all at the stream's last
        sequence, identically."""
        for r in cluster.replicas:
            wait_for(lambda r=r: answers(r.http_port)[0] == want, 60, f"{what} on a replica")
        last = cluster.quiet()
        seen = [answers(r.http_port) for r in cluster.replicas]
        for got, seqs in seen:
            assert got == want
            assert seqs == {last}
        assert seen[0] == seen[1]

    # the admits reach both replicas through the log
    agree(want, "the engines' admits")
    # a prefix neither engine saw whole still matches chunk by chunk; unknown tokens match nothing
    probe = work[1][: 2 * CHUNK] + [7, 7, 7]
    for r in cluster.replicas:
        assert lookup(r.http_port, probe)[0] == expected(probe) == {"lmc-a": [LOCATION, 2 * CHUNK]}
        assert lookup(r.http_port, [5] * 40)[0] == {}

    # /clear through replica 1: forwarded to the ingest, run on engine lmc-a
    status, _, body = request(cluster.replicas[1].http_port, "POST", "/clear",
                              {"instance_id": "lmc-a", "location": LOCATION})
    assert status == 200 and body["num_tokens"] > 0, body
    assert all(a.hit(tokens) == 0 for tokens in work)
    want = [expected(tokens) for tokens in work]
    assert not any("lmc-a" in w for w in want) and sum("lmc-b" in w for w in want) == len(work[::2])
    # the replica that answered shows the clear already; the other one once it has applied it
    assert answers(cluster.replicas[1].http_port)[0] == want
    agree(want, "the clear's evictions")
    assert "decode_errors" not in cluster.ingest.log()
