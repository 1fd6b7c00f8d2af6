"""KV-event ingest benchmark: a recorded vLLM fleet stream into our controller beside Dynamo.

    .venv/bin/python benchmarks/kv_events_ingest.py [--anchor-python PY] [--quick] [--profile]

The stream (``generate``; built and msgpack-encoded before any clock starts): 64 pods
(``kv@pod-N@model``, vLLM ≥ 0.24 map-encoded ``KVEventBatch`` ``[ts, [events], dp_rank]`` by
msgspec classes shaped as vLLM's), 16-token blocks, 4,096-token prompts that start with one of
16 shared system prompts (Zipf popularity), 128–512 generated tokens each. Each pod is a
small model of vLLM's scheduler and block pool: a 2,048-token step budget, up to 32 running
requests, prefix-cache hits on the system prompt, prefill chunks stored with their parent,
decode blocks stored one at a time as they fill, finished requests' blocks freed tail first
into an LRU free queue, and, when the pool (16,384 blocks) is full, the queue's head evicted
with one ``BlockRemoved`` of one hash per event (children before parents, as vLLM does). One
message per engine step that has events. Pods are interleaved step by step.

Measured, each side in the same invocation:
- ours, in-process: ``KVEventSource.receive`` over every recorded frame (decode, re-hash of
  the tokens with ``chunk_hashes``, engine-hash map, ``Index.apply_batch``): processing only;
- ours, end to end: a controller process (``--kv-events`` bound SUB on 127.0.0.1) fed by 64
  XPUB sockets (one per pod, connected to it, every subscription seen before the clock starts)
  from this process; the clock stops when ``/metrics`` shows every pod's next sequence number
  past its last message;
- Dynamo ``RadixTree.apply_event`` (ai-dynamo-runtime, in its own venv): one call per vLLM
  event with Dynamo's JSON event, built before the clock from the same stream — its
  ``tokens_hash`` per block computed with ``compute_block_hash_for_seq`` outside the clock, so
  this side is given already-hashed blocks and does no decoding (ours does both);
- Dynamo ``python -m dynamo.indexer`` end to end: its Rust ZMQ listeners connected to 64 bound
  XPUBs sending the same frames (it decodes msgpack and hashes the tokens itself); the clock
  stops when its ``/metrics`` counts every event applied.
Then wrk POSTs ``/lookup`` bodies (4,096-token prompts: half the prompts of requests some pod
still holds, half misses) to our controller, which now holds the stream's final state in a
16-token-block namespace, at 1 and 8 connections (http_bench's machinery and targets).
Results: benchmarks/results/kv_events_ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ANCHOR_PY, ROOT, cpu_seconds, fmt, free_port, loadavg, log, machine, publish, stop,  # noqa: E402
                    table, wait_quiet, write_json)

TARGET_BLOCKS_PER_S = 2e6
TARGET_RATIO = 3.0
VOCAB = 128_000
ENGINE_SEED = 0x5EED  # the stand-in for vLLM's sha256 block hashes: a different chain from ours
MODEL = "bench-model"


# --------------------------------------------------------------------------------------
# The recorded stream
# --------------------------------------------------------------------------------------


def vllm_classes():
    """msgspec classes shaped as vLLM 0.24's (vllm/distributed/kv_events.py): tagged maps,
    defaults left out, the batch an array."""
    import msgspec

    class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list
        parent_block_hash: int | None
        token_ids: list
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None = None
        extra_keys: list | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list
        medium: str | None
        group_idx: int | None = None

    class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list
        data_parallel_rank: int | None = None

    return BlockStored, BlockRemoved, KVEventBatch


class Pod:
    """One engine: vLLM's block pool and scheduler in miniature (see the module doc)."""

    def __init__(self, n: int, args, rng, system_prompts, sys_weights):
        self.n = n
        self.args = args
        self.rng = rng
        self.system_prompts = system_prompts
        self.sys_weights = sys_weights
        self.free: OrderedDict[int, None] = OrderedDict()  # cached, unused: evictable, LRU first
        self.ref: dict[int, int] = {}  # cached and in use: reference counts
        self.waiting = args.requests_per_pod
        self.running: list[dict] = []
        self.prefilling: dict | None = None
        self.events: list = []
        self.stats = {"stored_blocks": 0, "removed_blocks": 0, "stored_events": 0, "removed_events": 0,
                      "hit_blocks": 0, "tokens": 0}
        self.held_prompts: list[list[int]] = []  # prompts of finished requests (for lookups)

    def new_request(self) -> dict:
        import numpy as np

        a = self.args
        s = self.rng.choice(len(self.system_prompts), p=self.sys_weights)
        sys_tokens = self.system_prompts[s]
        user = self.rng.integers(1, VOCAB, size=a.prompt_tokens - len(sys_tokens), dtype=np.uint32)
        out_len = int(self.rng.integers(a.min_output // a.block_size, a.max_output // a.block_size + 1)) * a.block_size
        out = self.rng.integers(1, VOCAB, size=out_len, dtype=np.uint32)
        tokens = np.concatenate([sys_tokens, user, out]).tolist()
        from lmcache_rs import chunk_hashes

        hashes = chunk_hashes(tokens, a.block_size, ENGINE_SEED)
        prompt_blocks = a.prompt_tokens // a.block_size
        hit = 0
        while hit < prompt_blocks and (hashes[hit] in self.ref or hashes[hit] in self.free):
            self._use(hashes[hit])
            hit += 1
        self.stats["hit_blocks"] += hit
        return {"tokens": tokens, "hashes": hashes, "done": hit, "prompt_blocks": prompt_blocks,
                "total_blocks": len(hashes), "held": hit}

    def _use(self, h: int) -> None:
        if h in self.free:
            del self.free[h]
            self.ref[h] = 1
        else:
            self.ref[h] += 1

    def _allocate(self) -> None:
        while len(self.ref) + len(self.free) >= self.args.pool_blocks:
            if not self.free:  # (vLLM would preempt a request; this model does not)
                raise SystemExit("--pool-blocks is too small for --max-running requests of this size")
            h, _ = self.free.popitem(last=False)
            self.events.append(("removed", h))

    def _store(self, req: dict, start: int, end: int) -> None:
        bs = self.args.block_size
        for i in range(start, end):
            self._allocate()
            self.ref[req["hashes"][i]] = 1
        self.events.append(("stored", req["hashes"][start:end], req["hashes"][start - 1] if start else None,
                            req["tokens"][start * bs:end * bs]))
        req["done"] = req["held"] = end

    def _finish(self, req: dict) -> None:
        for h in reversed(req["hashes"][:req["held"]]):  # vLLM frees tail first: evicted first
            c = self.ref[h] - 1
            if c:
                self.ref[h] = c
            else:
                del self.ref[h]
                self.free[h] = None
        if len(self.held_prompts) < 64:
            self.held_prompts.append(req["tokens"][:self.args.prompt_tokens])
        else:
            self.held_prompts[self.rng.integers(64)] = req["tokens"][:self.args.prompt_tokens]

    def step(self) -> list | None:
        """One engine step; its events (None once the pod has nothing left to do)."""
        a = self.args
        if not (self.waiting or self.running or self.prefilling):
            return None
        self.events = []
        budget = a.step_tokens
        still = []
        for req in self.running:  # one token each; a block is stored when it fills
            budget -= 1
            req["generated"] += 1
            if req["generated"] % a.block_size == 0:
                b = req["prompt_blocks"] + req["generated"] // a.block_size
                self._store(req, b - 1, b)
            if req["generated"] == req["out_tokens"]:
                self._finish(req)
            else:
                still.append(req)
        self.running = still
        while budget >= a.block_size:
            if self.prefilling is None:
                if not self.waiting or len(self.running) >= a.max_running:
                    break
                self.waiting -= 1
                self.prefilling = self.new_request()
            req = self.prefilling
            n = min(budget // a.block_size, req["prompt_blocks"] - req["done"])
            if n:
                self._store(req, req["done"], req["done"] + n)
                budget -= n * a.block_size
            if req["done"] == req["prompt_blocks"]:
                req["generated"] = 0
                req["out_tokens"] = (req["total_blocks"] - req["prompt_blocks"]) * a.block_size
                self.running.append(req)
                self.prefilling = None
        return self.events


def generate(args) -> dict:
    """The recorded stream: frames in send order, per-pod message counts, what it holds."""
    import msgspec
    import numpy as np

    BlockStored, BlockRemoved, KVEventBatch = vllm_classes()
    enc = msgspec.msgpack.Encoder()
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_system // 16, args.max_system // 16 + 1, size=args.system_prompts) * 16
    lengths = lengths + rng.integers(0, args.block_size, size=args.system_prompts)  # not block-aligned
    system_prompts = [rng.integers(1, VOCAB, size=int(n), dtype=np.uint32) for n in lengths]
    w = 1.0 / np.arange(1, args.system_prompts + 1)
    pods = [Pod(n, args, np.random.default_rng(args.seed * 1000 + n), system_prompts, w / w.sum())
            for n in range(args.pods)]
    frames: list[tuple[int, int, bytes]] = []  # (pod, seq, payload) in send order
    seqs = [0] * args.pods
    step = 0
    live = list(pods)
    while live:
        nxt = []
        for pod in live:
            events = pod.step()
            if events is None:
                continue
            nxt.append(pod)
            if not events:
                continue
            out = []
            for ev in events:
                if ev[0] == "stored":
                    _, hashes, parent, tokens = ev
                    out.append(BlockStored(hashes, parent, tokens, args.block_size, None, "GPU", None,
                                           [None] * len(hashes), 0, "full_attention"))
                    pod.stats["stored_blocks"] += len(hashes)
                    pod.stats["stored_events"] += 1
                    pod.stats["tokens"] += len(tokens)
                else:
                    out.append(BlockRemoved([ev[1]], "GPU", 0))
                    pod.stats["removed_blocks"] += 1
                    pod.stats["removed_events"] += 1
            frames.append((pod.n, seqs[pod.n], enc.encode(KVEventBatch(1.7e9 + step * 0.02, out, 0))))
            seqs[pod.n] += 1
        live = nxt
        step += 1
    totals = {k: sum(p.stats[k] for p in pods) for k in pods[0].stats}
    totals["messages"] = len(frames)
    totals["payload_bytes"] = sum(len(f[2]) for f in frames)
    totals["blocks"] = totals["stored_blocks"] + totals["removed_blocks"]
    totals["events"] = totals["stored_events"] + totals["removed_events"]
    totals["steps"] = step
    # lookups: prompts some pod still held at its last finish, and as many misses
    held = [p for pod in pods for p in pod.held_prompts[:4]]
    misses = [rng.integers(1, VOCAB, size=args.prompt_tokens, dtype=np.uint32).tolist() for _ in held]
    return {"frames": frames, "seqs": seqs, "totals": totals, "queries": held + misses,
            "pods": [p.stats for p in pods]}


def topic(pod: int) -> bytes:
    return f"kv@pod-{pod}@{MODEL}".encode()


# --------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------


def ours_in_process(stream: dict, runs: int, profile: bool) -> dict:
    """``KVEventSource.receive`` per message (an index write each)."""
    from lmcache_rs import Index
    from lmcache_rs.controller.kv_event_source import KVEventSource
    from lmcache_rs.controller.metrics import Metrics
    from lmcache_rs.controller.registry import Registry
    from lmcache_rs.controller.settings import Settings

    frames = [(topic(pod), seq, payload) for pod, seq, payload in stream["frames"]]
    blocks = stream["totals"]["blocks"]
    times = []
    out: dict = {}

    async def one(prof=None) -> float:
        settings = Settings(kv_events=[{"bind": "tcp://127.0.0.1:0"}])
        metrics = Metrics()
        registry = Registry(Index(256), metrics, 3600.0)
        source = KVEventSource(settings, registry, metrics)
        sub = source.subscriptions[0]
        receive = source.receive
        gc.collect()
        if prof is not None:
            prof.enable()
        t = time.perf_counter()
        for tp, seq, payload in frames:
            receive(0, sub, tp, seq, payload)
        dt = time.perf_counter() - t
        if prof is not None:
            prof.disable()
        out["skipped"] = dict(source.counts)
        out["decoder_skipped"] = dict(source.decoder.counts)
        out["stale"] = source.stale_instances()
        out["admits"], out["evicts"] = metrics.admits, metrics.evicts
        ns = source.namespaces.all()
        out["namespaces"] = [n.describe() for n in ns]
        out["engine_blocks"] = sum(len(p.engine) for p in source.publishers.values())
        out["index_stats"] = {k: v for k, v in ns[0].index.stats().items() if isinstance(v, (int, float))}
        return dt

    for r in range(runs):
        dt = asyncio.run(one())
        times.append(dt)
        log(f"ours in-process, {r + 1}/{runs}: {blocks / dt / 1e6:.2f} M blocks/s "
            f"({dt:.2f} s)")
    if profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        asyncio.run(one(prof))
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        out["profile"] = s.getvalue()
        print(out["profile"], file=sys.stderr)
    best = min(times)
    out.update({"seconds": times, "blocks_per_s": blocks / best,
                "messages_per_s": stream["totals"]["messages"] / best})
    return out




def http_get(port: int, path: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


class Sender:
    """One XPUB per pod (connected to a bound SUB, or bound for a connecting SUB); returns
    once every socket has seen its subscriber's subscription, so nothing sent is dropped."""

    def __init__(self, endpoints: list[tuple[str, str]]):
        import zmq

        self.ctx = zmq.Context()
        self.socks = []
        for how, endpoint in endpoints:
            s = self.ctx.socket(zmq.XPUB)
            s.setsockopt(zmq.SNDHWM, 0)  # queue, never drop
            s.setsockopt(zmq.LINGER, 0)
            getattr(s, how)(endpoint)
            self.socks.append(s)

    def wait_subscribed(self, timeout: float = 60) -> None:
        import zmq

        deadline = time.time() + timeout
        for s in self.socks:
            while not s.poll(max(1, int((deadline - time.time()) * 1000)), zmq.POLLIN):
                if time.time() > deadline:
                    raise RuntimeError("a subscriber never subscribed")
            s.recv()

    def send(self, frames: list[tuple[int, int, bytes]]) -> float:
        socks = self.socks
        t = time.perf_counter()
        for pod, seq, payload in frames:
            socks[pod].send_multipart([topic(pod), seq.to_bytes(8, "big"), payload], copy=False)
        return t

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.ctx.term()




def wait_until(check, what: str, timeout: float, interval: float = 0.02) -> float:
    deadline = time.time() + timeout
    while True:
        if check():
            return time.perf_counter()
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)




def ours_e2e(stream: dict, args, then=None) -> dict:
    http, mon, zport = free_port(), free_port(), free_port()
    spec = json.dumps({"bind": f"tcp://127.0.0.1:{zport}"})
    cmd = [sys.executable, "-m", "lmcache_rs.controller", "--host", "127.0.0.1", "--port", str(http),
           "--monitor-port", str(mon), "--log-level", "WARNING", "--kv-events", spec]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log(f"ours e2e: {' '.join(cmd)}")
    ctl = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    sender = None
    try:
        wait_until(lambda: _answers(http), "our controller", 30, 0.05)
        imported = http_get(http, "/metrics")  # the controller imports its own code, not main's
        sender = Sender([("connect", f"tcp://127.0.0.1:{zport}")] * args.pods)
        sender.wait_subscribed()
        final = {f"pod-{p}": n for p, n in enumerate(stream["seqs"])}
        pattern = re.compile(r'^lmcache_kv_event_next_seq\{instance="([^"]+)"\} (\d+)', re.M)

        def done() -> bool:
            got = {m.group(1): int(m.group(2)) for m in pattern.finditer(http_get(http, "/metrics"))}
            return all(got.get(k) == v for k, v in final.items())

        cpu0 = cpu_seconds(ctl.pid)
        t0 = sender.send(stream["frames"])
        sent = time.perf_counter() - t0
        t1 = wait_until(done, "our controller to apply every batch", 600)
        dt = t1 - t0
        cpu = cpu_seconds(ctl.pid) - cpu0
        metrics = http_get(http, "/metrics")
        res = {"seconds": dt, "send_seconds": sent, "blocks_per_s": stream["totals"]["blocks"] / dt,
               "controller_cpu_s": cpu, "cmd": " ".join(cmd), "metrics_ok": "lmcache_kv_event" in imported,
               "skipped": [line for line in metrics.splitlines() if line.startswith("lmcache_kv_events_skipped")],
               "stale": [line for line in metrics.splitlines()
                         if line.startswith("lmcache_kv_event_publishers") and "stale" in line]}
        log(f"ours e2e: {res['blocks_per_s'] / 1e6:.2f} M blocks/s ({dt:.2f} s; sending took {sent:.2f} s; "
            f"controller CPU {cpu:.2f} s)")
        if then is not None:
            res.update(then(http, ctl.pid))
        return res
    finally:
        if sender is not None:
            sender.close()
        stop(ctl, "the controller")


def _answers(port: int) -> bool:
    try:
        http_get(port, "/metrics", timeout=1)
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# Lookups
# --------------------------------------------------------------------------------------


def lookups(stream: dict, args):
    """wrk on /lookup against the controller holding the stream's final state."""
    import http_bench

    def run(port: int, pid: int) -> dict:
        queries = stream["queries"]
        bodies = Path(tempfile.mkdtemp()) / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"tokens": q}, separators=(",", ":")) + "\n" for q in queries))
        # the answers first: a prompt a pod held when it finished still matches somewhere (its
        # system prompt at least, unless evicted since); a random prompt matches nowhere
        hits = sum(bool(json.loads(_post(port, q))["layout_info"]) for q in queries[:len(queries) // 2])
        false = sum(bool(json.loads(_post(port, q))["layout_info"]) for q in queries[len(queries) // 2:])
        log(f"lookups: {hits}/{len(queries) // 2} held prompts match somewhere, {false} random ones do")
        out = {"held_prompts_found": [hits, len(queries) // 2], "misses_answered": false}
        http_bench.run_wrk(port, 8, args.warmup, 1, bodies, pid)
        for c in (1, 8):
            runs = [http_bench.run_wrk(port, c, args.duration, 1, bodies, pid) for _ in range(args.repeats)]
            best = max(runs, key=lambda x: x["rps"])
            out[f"c{c}"] = {k: best[k] for k in ("rps", "p50_us", "p99_us", "server_cpu_cores", "errors")}
            out[f"c{c}"]["runs"] = [{k: x[k] for k in ("rps", "p50_us", "p99_us", "errors")} for x in runs]
            log(f"lookups c{c}: {best['rps']:.0f} req/s, p50 {best['p50_us']:.0f} us, p99 {best['p99_us']:.0f} us")
        return {"lookup": out}

    return run


def _post(port: int, tokens: list[int]) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/lookup", data=json.dumps({"tokens": tokens}).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


# --------------------------------------------------------------------------------------
# Dynamo
# --------------------------------------------------------------------------------------


def dynamo_radix_side(path: str, runs: int) -> dict:
    """In the anchor's venv: RadixTree.apply_event over the stream, converted before the clock."""
    from importlib.metadata import version

    import msgspec
    from dynamo.llm import RadixTree, compute_block_hash_for_seq

    frames = msgspec.msgpack.decode(Path(path).read_bytes())
    dec = msgspec.msgpack.Decoder()
    events: list[tuple[int, bytes]] = []
    blocks = 0
    ids = {}
    t = time.perf_counter()
    for pod, _seq, payload in frames:
        _ts, evs, rank = dec.decode(payload)
        for ev in evs:
            n = ids[pod] = ids.get(pod, -1) + 1
            if ev["type"] == "BlockStored":
                local = compute_block_hash_for_seq(ev["token_ids"], ev["block_size"])
                data = {"stored": {"parent_hash": ev["parent_block_hash"],
                                   "blocks": [{"block_hash": h, "tokens_hash": lh}
                                              for h, lh in zip(ev["block_hashes"], local)]}}
            else:
                data = {"removed": {"block_hashes": ev["block_hashes"]}}
            blocks += len(ev["block_hashes"])
            events.append((pod, json.dumps({"event_id": n, "data": data, "dp_rank": rank}).encode()))
    convert = time.perf_counter() - t
    times = []
    for _ in range(runs):
        tree = RadixTree()
        gc.collect()
        t = time.perf_counter()
        for worker, ev in events:
            tree.apply_event(worker, ev)
        tree.find_matches([0])  # ordered after the events: every one applied
        times.append(time.perf_counter() - t)
        log(f"dynamo RadixTree: {blocks / times[-1] / 1e6:.2f} M blocks/s ({times[-1]:.2f} s)")
        del tree
    return {"version": version("ai-dynamo-runtime"), "seconds": times, "blocks": blocks, "events": len(events),
            "blocks_per_s": blocks / min(times), "convert_seconds_untimed": convert}


def dynamo_indexer_e2e(stream: dict, args, anchor: str) -> dict:
    port = free_port()
    zports = [free_port() for _ in range(args.pods)]
    sender = Sender([("bind", f"tcp://127.0.0.1:{z}") for z in zports])
    workers = ",".join(f"{p}=tcp://127.0.0.1:{z}" for p, z in enumerate(zports))
    cmd = [anchor, "-m", "dynamo.indexer", "--port", str(port), "--block-size", str(args.block_size),
           "--model-name", MODEL, "--threads", str(args.dynamo_threads), "--workers", workers]
    log(f"dynamo indexer e2e: {' '.join(cmd[:9])} --workers <{args.pods} endpoints>")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sender.wait_subscribed()
        wait_until(lambda: _answers(port), "the Dynamo indexer", 30, 0.05)
        total = stream["totals"]["events"]
        pattern = re.compile(r'^dynamo_kvrouter_kv_cache_events_applied\{[^}]*status="([^"]+)"[^}]*\} (\d+)', re.M)

        def applied() -> dict[str, int]:
            out: dict[str, int] = {}
            for m in pattern.finditer(http_get(port, "/metrics")):
                out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
            return out

        cpu0 = cpu_seconds(proc.pid)
        t0 = sender.send(stream["frames"])
        sent = time.perf_counter() - t0
        t1 = wait_until(lambda: sum(applied().values()) >= total, "the Dynamo indexer to apply every event", 600)
        dt = t1 - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        res = {"seconds": dt, "send_seconds": sent, "blocks_per_s": stream["totals"]["blocks"] / dt,
               "indexer_cpu_s": cpu, "applied_by_status": applied(), "cmd": " ".join(cmd[:9]) + " --workers ..."}
        log(f"dynamo indexer e2e: {res['blocks_per_s'] / 1e6:.2f} M blocks/s ({dt:.2f} s; indexer CPU {cpu:.2f} s; "
            f"applied {res['applied_by_status']})")
        return res
    finally:
        sender.close()
        stop(proc, "dynamo.indexer")


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def report(res: dict) -> str:
    t = res["stream"]
    o, d = res.get("ours", {}), res.get("dynamo", {})
    lines = [
        f"Stream: {res['args']['pods']} pods, {t['messages']:,} messages, {t['events']:,} events, "
        f"{t['blocks']:,} blocks ({t['stored_blocks']:,} stored in {t['stored_events']:,} events, "
        f"{t['removed_blocks']:,} removed one per event), {t['tokens']:,} tokens, "
        f"{t['payload_bytes'] / 1e6:.0f} MB of msgpack; prefix hits {t['hit_blocks']:,} blocks.", ""]
    rows = []
    e2e, inproc = o.get("e2e", {}), o.get("in_process", {})
    radix, idx = d.get("radix_tree", {}), d.get("indexer", {})

    def bps(x: dict) -> str:
        return fmt(x["blocks_per_s"], 2) if "blocks_per_s" in x else "n/a"

    rows.append(["end to end (ZMQ, process), blocks/s", bps(e2e), "dynamo.indexer " + bps(idx),
                 f"{e2e['blocks_per_s'] / idx['blocks_per_s']:.1f}×" if e2e and idx else "",
                 f"≥ 2 M/s, ≥ {TARGET_RATIO:g}×"])
    rows.append(["in-process, message by message, blocks/s", bps(inproc), "RadixTree.apply_event " + bps(radix),
                 f"{inproc['blocks_per_s'] / radix['blocks_per_s']:.1f}×" if inproc and radix else "", ""])
    lk = e2e.get("lookup")
    if lk:
        rows.append(["/lookup p50, 1 connection", f"{lk['c1']['p50_us']:.0f} µs", "", "", "≤ 100 µs"])
        rows.append(["/lookup p99, 8 connections", f"{lk['c8']['p99_us']:.0f} µs", "", "", "≤ 1,000 µs"])
        rows.append(["/lookup req/s, 1 / 8 connections", f"{lk['c1']['rps']:,.0f} / {lk['c8']['rps']:,.0f}", "", "",
                     ""])
    lines.append(table(["measure", "lmcache_rs", "Dynamo " + d.get("version", ""), "ratio", "target"], rows))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=64)
    ap.add_argument("--requests-per-pod", type=int, default=120)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--min-output", type=int, default=128)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--system-prompts", type=int, default=16)
    ap.add_argument("--min-system", type=int, default=256)
    ap.add_argument("--max-system", type=int, default=2048)
    ap.add_argument("--step-tokens", type=int, default=2048, help="the scheduler's token budget per step")
    ap.add_argument("--max-running", type=int, default=32)
    ap.add_argument("--pool-blocks", type=int, default=16384, help="GPU blocks per pod")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--runs", type=int, default=3, help="in-process runs per side (best kept)")
    ap.add_argument("--dynamo-threads", type=int, default=4, help="dynamo.indexer --threads (its default: 4)")
    ap.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quiet-wait", type=float, default=20)
    ap.add_argument("--anchor-python", default=str(ANCHOR_PY))
    ap.add_argument("--only", choices=["ours", "dynamo"])
    ap.add_argument("--no-lookups", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile one more in-process run of ours")
    ap.add_argument("--quick", action="store_true", help="8 pods, fewer requests: a smoke run, not figures")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--stream", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="JSON result path (default benchmarks/results/kv_events_ingest.json)")
    args = ap.parse_args()
    if args.side == "dynamo-radix":
        write_json(args.out, dynamo_radix_side(args.stream, args.runs))
        return 0
    if args.quick:
        args.pods, args.requests_per_pod, args.pool_blocks, args.max_running = 8, 40, 4096, 8
        args.runs, args.duration, args.repeats = 1, 1, 1
    import msgspec

    res: dict = {"machine": machine(), "args": vars(args)}
    log("generating the stream")
    t = time.perf_counter()
    stream = generate(args)
    res["stream"] = stream["totals"]
    log(f"stream: {stream['totals']} in {time.perf_counter() - t:.1f} s")
    anchor = args.anchor_python
    have_dynamo = Path(anchor).exists() and args.only != "ours"
    if not have_dynamo and args.only != "ours":
        log(f"no anchor interpreter at {anchor} (run benchmarks/run_all.py --setup-only); Dynamo skipped")
    if args.only != "dynamo":
        res["ours"] = {"quiet_in_process": wait_quiet(args.quiet_wait), "loadavg_in_process": loadavg()}
        res["ours"]["in_process"] = ours_in_process(stream, args.runs, args.profile)
    if have_dynamo:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "stream.msgpack"
            path.write_bytes(msgspec.msgpack.encode(stream["frames"]))
            out = Path(tmp) / "radix.json"
            res["dynamo"] = {"quiet_radix": wait_quiet(args.quiet_wait), "loadavg_radix": loadavg()}
            subprocess.run([anchor, __file__, "--side", "dynamo-radix", "--stream", str(path), "--runs",
                            str(args.runs), "--out", str(out)], check=True, cwd=str(ROOT))
            res["dynamo"]["radix_tree"] = json.loads(out.read_text())
            res["dynamo"]["version"] = res["dynamo"]["radix_tree"]["version"]
        res["dynamo"]["quiet_indexer"] = wait_quiet(args.quiet_wait)
        res["dynamo"]["loadavg_indexer"] = loadavg()
        res["dynamo"]["indexer"] = dynamo_indexer_e2e(stream, args, anchor)
    if args.only != "dynamo":
        res["ours"]["quiet_e2e"] = wait_quiet(args.quiet_wait)
        res["ours"]["loadavg_e2e"] = loadavg()
        then = None if args.no_lookups else lookups(stream, args)
        res["ours"]["e2e"] = ours_e2e(stream, args, then)
    publish(res, "kv_events_ingest", report(res), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
