"""Ingest of LMCache workers' reports: our controller beside LMCache's own, same messages, same run.

A producer (LMCache's own message classes, run in .venv-interop) registers W workers through the
reply socket and pushes BatchedKVOperationMsg admits (``--ops-per-msg`` ops each, up to 50 frames
a multipart message, as LMCache's worker sends them) to the controller's pull socket as fast as
it can. Both controllers get the same number of keys. The clock runs from the first push until
the controller reports every key applied (both asked through LMCache's
``/controller/key-stats``, which ours answers too). Ours runs this checkout's code (``python -m
lmcache_rs.controller`` with ``python/`` first on the path).

Then, in process and without sockets, where each side's time goes on the same frames: ours
(decode and grouping, key packing, ``Index.apply_batch``; with frames read in Rust, as the
controller does, and all through msgspec, as it does frames of other shapes) and LMCache's (msgspec decode into
its message classes, its ``KVController.handle_batched_kv_operations``). Also times /lookup in
both key spaces of one Index pair on the same prompts.

    .venv/bin/python benchmarks/lmcache_ingest.py [--keys 2000000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, free_port  # noqa: E402

INTEROP_PY = ROOT / ".venv-interop" / "bin" / "python"

PRODUCER = r'''
import sys, time, json, zmq, msgspec
from lmcache.v1.cache_controller.message import (BatchedKVOperationMsg, KVOpEvent, OpType, RegisterMsg)
pull, reply, keys, workers, per_msg = (int(a) for a in sys.argv[1:6])
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER); dealer.connect(f"tcp://127.0.0.1:{reply}")
for w in range(workers):
    dealer.send_multipart([b"", msgspec.msgpack.encode(RegisterMsg(instance_id=f"inst{w}", worker_id=0,
                           ip="127.0.0.1", port=1, peer_init_url=None))])
    dealer.recv_multipart()
push = ctx.socket(zmq.PUSH); push.setsockopt(zmq.SNDHWM, 0); push.connect(f"tcp://127.0.0.1:{pull}")
frames_per_worker = []
per_worker = keys // workers
for w in range(workers):
    frames, seq = [], 0
    for start in range(0, per_worker, per_msg):
        ops = [KVOpEvent(op_type=OpType.ADMIT, key=(w << 40) + k - (1 << 62), seq_num=seq + i)
               for i, k in enumerate(range(start, min(start + per_msg, per_worker)))]
        seq += len(ops)
        frames.append(msgspec.msgpack.encode(BatchedKVOperationMsg(instance_id=f"inst{w}", worker_id=0,
                      location="LocalCPUBackend", operations=ops)))
    frames_per_worker.append(frames)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
t0 = time.time()
for frames in frames_per_worker:
    for i in range(0, len(frames), 50):
        push.send_multipart(frames[i:i + 50])
print(json.dumps({"sent_at": t0, "send_s": time.time() - t0}), flush=True)
sys.stdin.readline()
'''




def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def applied(http: int) -> int:
    """Keys the controller has applied, as both controllers report them."""
    return int(json.loads(get(f"http://127.0.0.1:{http}/controller/key-stats"))["total_key_count"])


def run_side(side: str, keys: int, workers: int, per_msg: int) -> dict:
    http, pull, reply = free_port(), free_port(), free_port()
    ports = json.dumps({"pull": pull, "reply": reply})
    env = dict(os.environ, PYTHONHASHSEED="123")
    if side == "ours":
        env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "lmcache_rs.controller", "--host", "127.0.0.1", "--port", str(http),
               "--monitor-port", str(free_port()), "--monitor-ports", ports, "--log-level", "WARNING"]
    else:
        cmd = [str(INTEROP_PY), "-m", "lmcache.v1.api_server", "--host", "127.0.0.1", "--port", str(http),
               "--monitor-ports", ports]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    producer = None
    try:
        wait_http(f"http://127.0.0.1:{http}/metrics")
        producer_env = dict(env)
        producer_env.pop("PYTHONPATH", None)
        producer = subprocess.Popen([str(INTEROP_PY), "-c", PRODUCER, str(pull), str(reply), str(keys),
                                     str(workers), str(per_msg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=producer_env)
        assert json.loads(producer.stdout.readline())["ready"]
        producer.stdin.write("go\n")
        producer.stdin.flush()
        sent = json.loads(producer.stdout.readline())
        total = (keys // workers) * workers
        deadline = time.time() + 600
        n = 0
        while time.time() < deadline:
            n = applied(http)
            if n >= total:
                break
            time.sleep(0.02)
        elapsed = time.time() - sent["sent_at"]
        producer.stdin.write("done\n")
        producer.stdin.flush()
        return {"side": side, "keys": total, "applied": n, "seconds": round(elapsed, 3),
                "admits_per_s": round(n / elapsed), "producer_send_s": round(sent["send_s"], 3)}
    finally:
        for proc in (producer, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


# The producer's frames, rebuilt in process: one list of multipart reads (each up to 50 frames).
FRAMES = r'''
def frames_of(Batched, Op, admit, keys, workers, per_msg):
    reads = []
    per_worker = keys // workers
    for w in range(workers):
        frames, seq = [], 0
        for start in range(0, per_worker, per_msg):
            ops = [Op(op_type=admit, key=(w << 40) + k - (1 << 62), seq_num=seq + i)
                   for i, k in enumerate(range(start, min(start + per_msg, per_worker)))]
            seq += len(ops)
            frames.append(msgspec.msgpack.encode(Batched(instance_id=f"inst{w}", worker_id=0,
                          location="LocalCPUBackend", operations=ops)))
        reads += [frames[i:i + 50] for i in range(0, len(frames), 50)]
    return reads
'''

THEIR_SPLIT = r'''
import asyncio, json, sys, time, msgspec
from lmcache.v1.cache_controller.message import BatchedKVOperationMsg, KVOpEvent, Msg, OpType
from lmcache.v1.cache_controller.controllers.kv_controller import KVController
from lmcache.v1.cache_controller.utils import RegistryTree
keys, workers, per_msg = (int(a) for a in sys.argv[1:4])
''' + FRAMES + r'''
reads = frames_of(BatchedKVOperationMsg, KVOpEvent, OpType.ADMIT, keys, workers, per_msg)
registry = RegistryTree()
for w in range(workers):
    registry.register_worker(f"inst{w}", 0, "127.0.0.1", 1, None, None, time.time())
kv = KVController(registry)
async def main():
    decode = handle = 0.0
    for frames in reads:  # as its pull loop: decode a frame, await its handler, next frame
        for part in frames:
            t0 = time.perf_counter()
            msg = msgspec.msgpack.decode(part, type=Msg)
            t1 = time.perf_counter()
            await kv.handle_batched_kv_operations(msg)
            decode += t1 - t0
            handle += time.perf_counter() - t1
    assert registry.get_total_kv_count() == keys
    return decode, handle
decode, handle = asyncio.run(main())
print(json.dumps({"decode_ns_per_key": round(decode / keys * 1e9), "handle_ns_per_key": round(handle / keys * 1e9)}))
'''


def split_ours(keys: int, workers: int, per_msg: int, native: bool = True) -> dict:
    """Our pull loop's work on the same frames, in process: per read, decode + group, pack, apply.
    ``native``: frames read in Rust (keys packed there: pack is only joining), else all through
    msgspec (the path frames of other shapes take)."""
    import asyncio

    import msgspec

    sys.path.insert(0, str(ROOT / "python"))
    from lmcache_rs import Index
    from lmcache_rs.controller import lmcache_messages as m
    from lmcache_rs.controller.lmcache_source import LMCacheSource, PendingOps
    from lmcache_rs.controller.metrics import Metrics
    from lmcache_rs.controller.registry import Registry
    from lmcache_rs.controller.settings import Settings

    scope: dict = {"msgspec": msgspec}
    exec(FRAMES, scope)
    reads = scope["frames_of"](m.BatchedKVOperationMsg, lambda op_type, key, seq_num: m.AdmitOp(key, seq_num),
                               None, keys, workers, per_msg)

    async def main() -> dict:
        metrics = Metrics()
        source = LMCacheSource(Settings(monitor_ports={"pull": 0}), Registry(Index(256), metrics, 10.0),
                               Index(256, key_space="lmcache_builtin"), metrics)
        source.native_push = native
        for w in range(workers):
            source.on_request(m.RegisterMsg(instance_id=f"inst{w}", worker_id=0, ip="127.0.0.1", port=1,
                                            peer_init_url=None))
        decode = pack = apply = 0.0
        for frames in reads:  # one read per index batch (the loop joins reads waiting; none here)
            t0 = time.perf_counter()
            pending = PendingOps()
            source.read_pull(frames, pending)
            t1 = time.perf_counter()
            events = pending.events()
            t2 = time.perf_counter()
            source.index.apply_batch(events)
            decode += t1 - t0
            pack += t2 - t1
            apply += time.perf_counter() - t2
        assert source.index.stats()["holdings"] == keys
        return {"decode_group_ns_per_key": round(decode / keys * 1e9), "pack_ns_per_key": round(pack / keys * 1e9),
                "apply_batch_ns_per_key": round(apply / keys * 1e9)}

    return asyncio.run(main())


def split_theirs(keys: int, workers: int, per_msg: int) -> dict:
    out = subprocess.run([str(INTEROP_PY), "-c", THEIR_SPLIT, str(keys), str(workers), str(per_msg)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def lookup_spaces(prompts: int, length: int) -> dict:
    """/lookup p50 in each key space of one Index pair, in process (no HTTP): the hash chain's cost."""
    sys.path.insert(0, str(ROOT / "python"))
    from lmcache_rs import Index, chunk_hashes, lmcache_chunk_hashes

    rng = random.Random(7)
    work = [[rng.randrange(128000) for _ in range(length)] for _ in range(prompts)]
    out = {}
    for name, index, keys_of in (
        ("xxh3", Index(256), lambda t: chunk_hashes(t, 256)),
        ("lmcache_builtin", Index(256, key_space="lmcache_builtin", none_hash=-6197052367682486848),
         lambda t: lmcache_chunk_hashes(t, 256, -6197052367682486848)),
    ):
        for i, t in enumerate(work):
            index.admit(f"inst{i % 8}", 0, "LocalCPUBackend", hashes=keys_of(t))
        times = []
        for _ in range(5):
            for t in work:
                t0 = time.perf_counter()
                index.lookup(t)
                times.append(time.perf_counter() - t0)
        out[name] = {"p50_us": round(statistics.median(times) * 1e6, 1),
                     "p99_us": round(sorted(times)[int(len(times) * 0.99)] * 1e6, 1)}
    out["ratio_p50"] = round(out["lmcache_builtin"]["p50_us"] / out["xxh3"]["p50_us"], 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=2_000_000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--ops-per-msg", type=int, default=50)
    p.add_argument("--json")
    args = p.parse_args()
    report = {
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}",
        "ours": run_side("ours", args.keys, args.workers, args.ops_per_msg),
        "lmcache": run_side("lmcache", args.keys, args.workers, args.ops_per_msg),
        "in_process_split": {"ours": split_ours(args.keys, args.workers, args.ops_per_msg),
                             "ours_msgspec_path": split_ours(args.keys, args.workers, args.ops_per_msg, native=False),
                             "lmcache": split_theirs(args.keys, args.workers, args.ops_per_msg)},
        "lookup_4k_tokens": lookup_spaces(200, 4096),
    }
    report["ratio_admits"] = round(report["ours"]["admits_per_s"] / max(1, report["lmcache"]["admits_per_s"]), 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
