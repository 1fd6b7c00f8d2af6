"""The same real LMCache engines, the same stores, the same /lookup queries: once against
LMCache 0.5.6's own controller (``python -m lmcache.v1.api_server`` from the interop venv),
once against ours.

The oracle is the engines themselves: each engine's own ``lookup`` of a query is the prefix
that instance holds. Ours must answer exactly that for every instance. LMCache's controller
walks the query's chunks and credits each chunk to the first registered instance holding it
(``KVController.lookup`` over ``RegistryTree.find_kv``), so it lists an instance only where it
holds more of the query than every instance registered before it; where it lists one, its
figure must be the oracle's. docs/lmcache-compat.md, "Differences", states the rule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_worker import ControllerProcess  # noqa: E402
from lmcache_engines import INTEROP_PY, SEED, Engine, free_ports, require_interop_venv, wait_for  # noqa: E402

# LMCache's controller hashes /lookup tokens with a default ChunkedTokenDatabase: 256-token
# chunks whatever its workers use, so the engines use 256 here.
CHUNK = 256
LOCATION = "LocalCPUBackend"

require_interop_venv()


def _http(port: int, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read()) if "json" in r.headers.get("Content-Type", "") else {"text": r.read().decode()}


class TheirController:
    """LMCache's controller, as its users start it."""

    name = "lmcache"

    def __init__(self, pull: int, reply: int):
        (self.http_port,) = free_ports(1)
        ports = json.dumps({"pull": pull, "reply": reply})
        env = dict(os.environ, PYTHONHASHSEED=SEED)
        env.pop("PYTHONPATH", None)
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"lmcache-controller-{os.getpid()}.log", "w")
        self.proc = subprocess.Popen([str(INTEROP_PY), "-m", "lmcache.v1.api_server", "--host", "127.0.0.1",
                                      "--port", str(self.http_port), "--monitor-ports", ports],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

        def up() -> bool:
            assert self.proc.poll() is None, "LMCache's controller exited"
            try:
                self.holdings()
                return True
            except OSError:
                return False

        wait_for(up, 120, "LMCache's controller")

    def holdings(self) -> int:
        return _http(self.http_port, "/controller/key-stats")["total_key_count"]

    def lookup(self, tokens: list[int]) -> dict:
        return _http(self.http_port, "/lookup", {"tokens": tokens})["layout_info"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class OurController:
    name = "ours"

    def __init__(self, pull: int, reply: int):
        self.ctl = ControllerProcess("--monitor-ports", json.dumps({"pull": pull, "reply": reply}),
                                     "--worker-host-override", "127.0.0.1", "--chunk-size", str(CHUNK),
                                     env={"PYTHONHASHSEED": SEED})
        self.ctl.start()
        self.http_port = self.ctl.http_port

    def holdings(self) -> int:  # the endpoint LMCache's controller is asked through
        return _http(self.http_port, "/controller/key-stats")["total_key_count"]

    def lookup(self, tokens: list[int]) -> dict:
        return _http(self.http_port, "/lookup", {"tokens": tokens})["layout_info"]

    def close(self) -> None:
        self.ctl.__exit__(None, None, None)


def _tokens(seed: int, n: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1, 128000) for _ in range(n)]


# What each instance stores (A registers first), and the queries. Prompt lengths are not
# multiples of the chunk: the partial last chunk is saved (save_unfull_chunk) and matched.
X, Y, Z, V = _tokens(1, 3 * CHUNK + 40), _tokens(2, 4 * CHUNK + 100), _tokens(3, 3 * CHUNK + 7), _tokens(4, 700)
STORES = {
    "lmc-a": [X, Y[: 2 * CHUNK], Z, V],
    "lmc-b": [X, Y, Z[: 2 * CHUNK]],
}
QUERIES = {
    "both hold all of it": X,
    "the later instance holds more": Y,
    "the later instance holds more, then a miss": Y[: 3 * CHUNK] + [9] * 50,
    "the first instance holds more": Z,
    "both hold the same prefix, then a miss": Z[: 2 * CHUNK] + [9] * 50,
    "one instance, whole prompt": V,
    "one instance, prefix off a chunk boundary": V[:300],
    "nobody": _tokens(5, 2 * CHUNK),
    "shorter than a chunk, nobody": [3, 1, 4, 1, 5],
}


# LMCache's read-only registry endpoints, asked of both controllers after the stores
LISTINGS = ("/controller/key-stats", "/controller/workers", "/controller/workers?instance_id=lmc-b",
            "/controller/workers?instance_id=lmc-a&worker_id=0")


def run_scenario(controller_class) -> tuple[dict, dict, dict]:
    """Start the controller and the engines, store, and return (answers, truth) per query (the
    controller's /lookup and, per instance, what that engine itself holds of the query) and the
    controller's answers to LISTINGS."""
    pull, reply = free_ports(2)
    controller = controller_class(pull, reply)
    engines: list[Engine] = []
    ports: dict[str, int] = {}  # each engine's worker port
    try:
        expected = 0
        for instance_id, prompts in STORES.items():  # one at a time: A registers before B
            (port,) = free_ports(1)
            ports[instance_id] = port
            engine = Engine(instance_id, pull, reply, port, chunk_size=CHUNK, heartbeat=None, loopback=True)
            engines.append(engine)
            keys: set[int] = set()
            for tokens in prompts:
                keys.update(engine.keys(tokens))
                engine.store(tokens)
            expected += len(keys)
            wait_for(lambda: controller.holdings() == expected, 60,
                     f"{controller.name}'s controller to hold {instance_id}'s {len(keys)} chunks")
        answers = {name: controller.lookup(tokens) for name, tokens in QUERIES.items()}
        truth = {name: {e.instance_id: hit for e in engines if (hit := e.hit(tokens))}
                 for name, tokens in QUERIES.items()}
        listings = {path: _http(controller.http_port, path) for path in LISTINGS}
        for listing in listings.values():  # each run's engines listen on fresh ports
            for worker in listing.get("workers", [listing] if "worker_id" in listing else []):
                assert worker["port"] == ports[worker["instance_id"]], (controller.name, listing)
        return answers, truth, listings
    finally:
        for engine in engines:
            engine.stop()
        controller.close()


def first_holder_rule(truth: dict[str, int], order: list[str]) -> dict[str, int]:
    """LMCache's answer given each instance's true prefix: an instance is listed only where it
    holds more than every instance registered before it."""
    out, best = {}, 0
    for instance_id in order:
        hit = truth.get(instance_id, 0)
        if hit > best:
            out[instance_id] = hit
            best = hit
    return out


def _without_clocks(listing: dict) -> dict:
    """A listing without what differs between runs: registration and heartbeat times, ports."""
    def strip(worker: dict) -> dict:
        return {k: v for k, v in worker.items() if k not in ("registration_time", "last_heartbeat_time", "port")}
    if "workers" in listing:
        return {**listing, "workers": [strip(w) for w in listing["workers"]]}
    return strip(listing) if "worker_id" in listing else listing


def test_same_engines_against_lmcache_controller_and_ours():
    theirs, truth_theirs, listings_theirs = run_scenario(TheirController)
    ours, truth_ours, listings_ours = run_scenario(OurController)
    assert truth_theirs == truth_ours  # the engines held the same on both runs
    truth = truth_ours
    order = list(STORES)
    differ = []
    for name in QUERIES:
        # ours: every holder, each with its own prefix
        assert ours[name] == {i: [LOCATION, n] for i, n in truth[name].items()}, name
        # LMCache's: whatever it lists is right ...
        for instance_id, (location, n) in theirs[name].items():
            assert (location, n) == (LOCATION, truth[name][instance_id]), (name, theirs[name])
        # ... and it lists exactly the instances the first-holder rule keeps
        assert {i: n for i, (_, n) in theirs[name].items()} == first_holder_rule(truth[name], order), name
        if theirs[name] != ours[name]:
            differ.append(name)
    # the scenario exercises both the agreement and the documented difference
    assert differ == ["both hold all of it", "the first instance holds more", "both hold the same prefix, then a miss"]
    assert len(ours["the later instance holds more"]) == 2 and ours["nobody"] == {}
    # the registry endpoints: the same counts and workers from both
    for path in LISTINGS:
        assert _without_clocks(listings_theirs[path]) == _without_clocks(listings_ours[path]), path
    stats = listings_ours["/controller/key-stats"]
    assert stats["total_instance_count"] == 2 and stats["total_worker_count"] == 2
    assert stats["total_key_count"] > 0


# What an LMCache worker with P2P on asks the controller before fetching from a peer: the
# holder of a run of its chunk keys and that holder's P2P URL. Sent with LMCache's own message
# classes (in the interop venv) to each controller's reply socket, after admits on its pull socket.
P2P_CLIENT = r'''
import json, sys, time, zmq, msgspec
from lmcache.v1.cache_controller.message import (BatchedKVOperationMsg, BatchedP2PLookupMsg, KVOpEvent, Msg,
                                                 OpType, RegisterMsg)
pull, reply = int(sys.argv[1]), int(sys.argv[2])
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER); dealer.connect(f"tcp://127.0.0.1:{reply}")
def ask(msg):
    dealer.send_multipart([b"", msgspec.msgpack.encode(msg)])
    return msgspec.msgpack.decode(dealer.recv_multipart()[-1], type=Msg)
peers = {"p2p-a": "127.0.0.1:18201", "p2p-b": "127.0.0.1:18202", "p2p-nourl": None}
for i, (instance_id, url) in enumerate(peers.items()):
    ask(RegisterMsg(instance_id=instance_id, worker_id=0, ip="127.0.0.1", port=18100 + i, peer_init_url=url))
# one PUSH connection keeps the order: once b's admits show, the others' are in too
held = {"p2p-nourl": list(range(1, 9)), "p2p-a": list(range(1, 5)), "p2p-b": list(range(1, 7))}
push = ctx.socket(zmq.PUSH); push.connect(f"tcp://127.0.0.1:{pull}")
for instance_id, keys in held.items():
    ops = [KVOpEvent(op_type=OpType.ADMIT, key=k, seq_num=s) for s, k in enumerate(keys)]
    push.send(msgspec.msgpack.encode(BatchedKVOperationMsg(instance_id=instance_id, worker_id=0,
                                                           location="LocalCPUBackend", operations=ops)))
def lookup(asker, keys):
    return [list(x) for x in ask(BatchedP2PLookupMsg(hashes=keys, instance_id=asker, worker_id=0)).layout_info]
deadline = time.time() + 60
while lookup("p2p-c", [6])[0][2] == 0 and time.time() < deadline:
    time.sleep(0.05)
cases = {"from a third instance": ("p2p-c", list(range(1, 9))), "the asker is excluded": ("p2p-a", list(range(1, 9))),
         "only b holds the first key": ("p2p-c", [5, 6, 1, 7]), "only a holder without a P2P URL": ("p2p-c", [7, 8]),
         "nobody": ("p2p-c", [99]), "no keys": ("p2p-c", [])}
print(json.dumps({name: lookup(*args) for name, args in cases.items()}))
'''


def _p2p_answers(controller_class) -> dict:
    pull, reply = free_ports(2)
    controller = controller_class(pull, reply)
    try:
        env = dict(os.environ, PYTHONHASHSEED=SEED)
        env.pop("PYTHONPATH", None)
        run = subprocess.run([str(INTEROP_PY), "-c", P2P_CLIENT, str(pull), str(reply)], capture_output=True,
                             text=True, timeout=180, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        controller.close()


def test_p2p_lookup_against_lmcache_controller_and_ours():
    """BatchedP2PLookupMsg: ours names the instance (other than the asker, with a P2P URL)
    holding the longest run of the keys; LMCache's names the first registered holder of the
    first key and counts that one's run. Where only one instance qualifies, both agree."""
    theirs, ours = _p2p_answers(TheirController), _p2p_answers(OurController)
    b_url = "127.0.0.1:18202"
    assert ours == {
        "from a third instance": [["p2p-b", "LocalCPUBackend", 6, b_url]],
        "the asker is excluded": [["p2p-b", "LocalCPUBackend", 6, b_url]],
        "only b holds the first key": [["p2p-b", "LocalCPUBackend", 3, b_url]],
        "only a holder without a P2P URL": [["", "", 0, ""]],
        "nobody": [["", "", 0, ""]],
        "no keys": [["", "", 0, ""]],
    }
    # LMCache's: the first registered holder of the first key, here the one with the shorter run
    assert theirs["from a third instance"] == [["p2p-a", "LocalCPUBackend", 4, "127.0.0.1:18201"]]
    for name in ("the asker is excluded", "only b holds the first key", "nobody", "no keys"):
        assert theirs[name] == ours[name], (name, theirs[name])
