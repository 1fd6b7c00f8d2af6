"""Synthetic workers for http_bench: report the workload to our controller's monitor port
exactly as docs/protocol.md says a worker does, without holding any KV tensors.

Runs in the project venv (.venv). Frames are a 4-byte big-endian length and a msgpack map;
chunk keys are lmcache_rs.chunk_hashes packed as little-endian u64.

--phase populate (a daemon): for each instance, worker 0 connects, sends ``hello``, reads
  ``welcome``, full-syncs the prompts it holds (``sync_start``, ``sync_chunk``s,
  ``sync_end``), waits for the ``ping``/``pong`` barrier, checks a sample of queries over
  HTTP, prints one JSON line and then heartbeats until its stdin closes (then ``bye``).
--phase e2e: fresh instances send ``events`` frames of admits (random keys) as fast as the
  socket takes them, then ``ping``; the clock stops at the last ``pong``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import socket
import struct
import sys
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload as wlmod  # noqa: E402
from common import log  # noqa: E402

HEADER = struct.Struct(">I")
MAX_KEYS_PER_SYNC_CHUNK = 65536


def frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


class Link:
    """One worker's report connection."""

    def __init__(self, host: str, port: int, instance_id: str, worker_id: int, chunk_size: int, seed: int):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.instance_id = instance_id
        self.buf = b""
        self.seq = 0
        self.lock = threading.Lock()
        self.send({
            # docs/protocol.md; this script speaks the wire without importing lmcache_rs
            "t": "hello", "v": 2, "instance_id": instance_id, "worker_id": worker_id, "world_size": worker_id + 1,
            "host": "127.0.0.1", "worker_port": 1, "p2p_host": "127.0.0.1", "p2p_port": 1,
            "chunk_size": chunk_size, "seed": seed,
        })
        welcome = self.recv()
        if welcome.get("t") != "welcome":
            raise SystemExit(f"{instance_id}: hello answered {welcome!r}")
        self.heartbeat_interval = float(welcome.get("heartbeat_interval", 2.0))

    def send(self, message: dict) -> None:
        self.send_raw(frame(message))

    def send_raw(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def recv(self) -> dict:
        while True:
            if len(self.buf) >= 4:
                (n,) = HEADER.unpack_from(self.buf)
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return msgpack.unpackb(body, raw=False)
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError(f"{self.instance_id}: controller closed the connection")
            self.buf += data

    def full_sync(self, location: str, keys: bytes) -> None:
        self.send({"t": "sync_start", "seq": self.seq})
        step = MAX_KEYS_PER_SYNC_CHUNK * 8
        for start in range(0, len(keys), step):
            self.send({"t": "sync_chunk", "location": location, "hashes": keys[start:start + step]})
        self.send({"t": "sync_end", "count": len(keys) // 8})

    def barrier(self, request_id: int) -> None:
        self.send({"t": "ping", "id": request_id})
        while True:
            m = self.recv()
            if m.get("t") == "pong" and m.get("id") == request_id:
                return
            if m.get("t") in ("error", "resync"):
                raise SystemExit(f"{self.instance_id}: controller sent {m!r}")

    def heartbeat(self) -> None:
        self.send({"t": "heartbeat", "seq": self.seq})

    def bye(self) -> None:
        try:
            self.send({"t": "bye"})
            self.sock.close()
        except OSError:
            pass


def http_lookup(http: str, tokens: list[int]) -> dict:
    req = urllib.request.Request(f"http://{http}/lookup", data=json.dumps({"tokens": tokens}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def answer_of(resp: dict) -> dict[str, int]:
    return {inst: int(v[1]) for inst, v in resp.get("layout_info", {}).items()}


def populate(args) -> None:
    import lmcache_rs

    host, port = args.monitor.rsplit(":", 1)
    wl = wlmod.http_workload(seed=args.seed, instances=args.instances, prompts_per_instance=args.prompts,
                             prompt_tokens=args.prompt_tokens, chunk_size=256, queries=args.queries)
    log(f"ours: hashing {wl.stored_chunks} stored chunks with lmcache_rs.chunk_hashes")
    keys = [b"".join(np.asarray(lmcache_rs.chunk_hashes(a[p], 256, 0), dtype="<u8").tobytes()
                     for p in range(a.shape[0])) for a in wl.stored]
    t0 = time.perf_counter()
    links = [Link(host, int(port), inst, 0, 256, 0) for inst in wl.instances]
    for link, k in zip(links, keys):
        link.full_sync(wlmod.LOCATION, k)
    for n, link in enumerate(links):
        link.barrier(n + 1)
    dt = time.perf_counter() - t0
    log(f"ours: {len(links)} workers full-synced {wl.stored_chunks} chunks in {dt:.3f}s")
    agree = 0
    mismatches = []
    for toks, expected in wl.queries[: args.check]:
        got = answer_of(http_lookup(args.http, toks.tolist()))
        if got == expected:
            agree += 1
        elif len(mismatches) < 3:
            mismatches.append({"expected": expected, "got": got})
    sample = http_lookup(args.http, wl.stored[0][0].tolist())
    print(json.dumps({
        "ready": True, "chunks": wl.stored_chunks, "sync_s": dt, "checked": min(args.check, len(wl.queries)),
        "agree": agree, "mismatches": mismatches,
        "sample_lookup_prompt0_inst0": {k: v for k, v in sample.items() if k != "event_id"},
    }), flush=True)
    # heartbeat until told to stop (stdin closes)
    interval = min(link.heartbeat_interval for link in links) / 2
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], interval)
        if readable and not sys.stdin.readline():
            break
        for link in links:
            link.heartbeat()
    for link in links:
        link.bye()


def e2e(args) -> None:
    host, port = args.monitor.rsplit(":", 1)
    n_workers = args.instances
    per_worker = args.admits // n_workers
    ops_per_frame = args.ops_per_frame
    keys_per_op = args.keys_per_op
    rng = random.Random(args.seed + 100)
    log(f"ours e2e: preparing {per_worker * n_workers:,} admits as events frames "
        f"({ops_per_frame} ops x {keys_per_op} keys)")
    links = []
    payloads = []
    for w in range(n_workers):
        link = Link(host, int(port), f"e2e{w}", 0, 256, 0)
        link.full_sync(wlmod.LOCATION, b"")  # holds nothing yet
        links.append(link)
        raw = rng.randbytes(per_worker * 8)
        frames = []
        step = ops_per_frame * keys_per_op * 8
        for start in range(0, len(raw), step):
            block = raw[start:start + step]
            ops = [["admit", wlmod.LOCATION, block[o:o + keys_per_op * 8]]
                   for o in range(0, len(block), keys_per_op * 8)]
            link.seq += 1
            frames.append(frame({"t": "events", "seq": link.seq, "ops": ops}))
        payloads.append(frames)
    for n, link in enumerate(links):
        link.barrier(1000 + n)  # the empty syncs are applied: the clock measures only the events
    total = per_worker * n_workers
    t0 = time.perf_counter()
    # interleave the workers' frames, as concurrent workers would arrive
    for i in range(max(len(p) for p in payloads)):
        for link, frames in zip(links, payloads):
            if i < len(frames):
                link.send_raw(frames[i])
    sent = time.perf_counter()
    for n, link in enumerate(links):
        link.barrier(2000 + n)
    done = time.perf_counter()
    for link in links:
        link.bye()
    log(f"ours e2e: {total:,} admits applied in {done - t0:.3f}s")
    print(json.dumps({
        "admits": total, "frames": sum(len(p) for p in payloads), "ops_per_frame": ops_per_frame,
        "keys_per_op": keys_per_op, "send_s": sent - t0, "end_to_end_s": done - t0,
        "admits_per_s": total / (done - t0),
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["populate", "e2e"], required=True)
    ap.add_argument("--monitor", required=True, help="controller monitor host:port")
    ap.add_argument("--http", required=True, help="controller HTTP host:port")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--check", type=int, default=64)
    ap.add_argument("--admits", type=int, default=1_000_000, help="e2e: admits in all")
    ap.add_argument("--ops-per-frame", type=int, default=256, help="e2e: ops per events frame")
    ap.add_argument("--keys-per-op", type=int, default=16, help="e2e: keys per op (a 4k-token prompt)")
    args = ap.parse_args()
    if args.phase == "populate":
        populate(args)
    else:
        e2e(args)


if __name__ == "__main__":
    main()
