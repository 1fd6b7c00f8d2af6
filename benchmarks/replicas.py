"""Replicas on NATS JetStream (docs/replicas.md): follow rate, warm restart, late join,
replication lag and the lookup cost of following, on one machine over loopback.

    .venv/bin/python benchmarks/replicas.py [--holdings 2000000] [--rate 10000] [--out FILE]

Starts its own ``nats-server -js`` (store in a temp dir), publishes index operations straight
to the stream (the ingest's message format, jetstream.py) and runs replicas as processes:

1. follow rate: an in-process Follower applies ``--holdings`` admitted keys (1,000 per
   message) from the stream into an Index: keys/s;
2. replica A (``--snapshot``, interval 2 s) follows the same stream, writes its snapshots and,
   holding the lease, uploads the shared one and purges the stream;
3. late join: replica B (no snapshot) starts after the purge: seconds to ready (shared snapshot
   + what followed);
4. warm restart: A is killed (-9), a backlog of 200 messages x 1,000 keys is published, A starts
   again: seconds to ready (local snapshot + backlog);
5. lag: a fresh replica C follows alone while ``--rate`` messages/s (16 keys each) are
   published for 5 s: publish-to-applied p50/p99 as C measures it;
6. lookups per CPU-second of C: pipelined /lookup on two connections for 5 s, without and then
   with a follow load of 2,000 messages/s;
7. write latency, in process: an Index holding ``--holdings`` keys takes 50,000 ``apply_batch``
   calls of 16 new keys each (the lag phase's writes, which cross a resize of the table):
   p50/p99/p99.9/max per call. A replica's lag tail is its slowest writes;
8. with ``--curve N``: the N-replica curve. For n = 1..N, n fresh replicas follow 2,000
   messages/s while one wrk per replica (``benchmarks/lookup.lua``, 8 connections) posts
   /lookup for 5 s: total requests/s, each replica's CPU cores and its lag p99. With
   ``--pin``, replica i runs on core i and its wrk on core N + i, so the curve shows how
   replicas add up rather than how they share cores; that needs 2N cores beside the ones
   nats-server and the publisher use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_seconds, free_port, loadavg, log, wait_quiet, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "python"))
from lmcache_rs import Index  # noqa: E402
from lmcache_rs.controller.follower import Follower  # noqa: E402
from lmcache_rs.controller.jetstream import STREAM, encode, ensure_stream, message_id  # noqa: E402
from lmcache_rs.controller.oplog import apply_message  # noqa: E402

CHUNK = 256
INSTANCES = 8


class Nats:
    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
                                      str(root / "js")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class Replica:
    def __init__(self, root: Path, name: str, url: str, *args: str, pin_core: int | None = None):
        self.port = free_port()
        self.log = root / f"{name}.log"
        pin = [] if pin_core is None else ["taskset", "-c", str(pin_core)]
        self.cmd = [*pin, sys.executable, "-m", "lmcache_rs.controller", "--role", "replica", "--nats-url", url,
                    "--port", str(self.port), "--chunk-size", str(CHUNK), "--log-level", "WARNING", *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Start and wait until /healthz says ready; seconds it took."""
        env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), LMCACHE_CONTROLLER_MONITOR_PORTS="none")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env)
        while True:
            state = self.healthz()
            if state is not None and state.get("ready"):
                return time.monotonic() - t0
            if self.proc.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError(f"replica did not get ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.02)

    def healthz(self) -> dict | None:
        import http.client

        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("GET", "/healthz")
            return json.loads(conn.getresponse().read())
        except (OSError, ValueError):
            return None

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def admit_message(rng: random.Random, n_keys: int) -> list:
    inst = f"inst{rng.randrange(INSTANCES)}"
    keys = [rng.getrandbits(64) for _ in range(n_keys)]
    return [["rs", "admit", inst, 0, "LocalCPUBackend", keys]]


async def publish(url: str, count: int, n_keys: int, rate: float | None, seed: int, start_n: int) -> float:
    """Publish ``count`` messages (paced at ``rate``/s when given); returns the seconds it took."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_stream(js)
    rng = random.Random(seed)
    t0 = time.monotonic()
    for i in range(count):
        n = start_n + i
        payload = encode("bench", 1, n, time.time(), admit_message(rng, n_keys))
        await js.publish_async("lmc.ops.bench", payload, headers={"Nats-Msg-Id": message_id("bench", 1, n)})
        if rate is not None:
            ahead = t0 + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        if i % 1000 == 999:
            await js.publish_async_completed()
    await js.publish_async_completed()
    took = time.monotonic() - t0
    await nc.close()
    return took


async def follow_rate(url: str, holdings: int) -> dict:
    index = Index(CHUNK)
    follower = Follower(url, "bench", lambda msg: apply_message(msg["ops"], lambda space: index))
    t0, c0 = time.monotonic(), time.process_time()
    await follower.start(0)
    await follower.wait_applied(follower.start_target, 300)
    took, cpu = time.monotonic() - t0, time.process_time() - c0
    await follower.stop()
    n = index.stats()["holdings"]
    return {"holdings": n, "seconds": round(took, 3), "keys_per_s": round(n / took),
            "keys_per_cpu_s": round(n / max(cpu, 1e-9))}


def replica_curve(root: Path, url: str, most: int, pin: bool, start_n: int) -> list[dict]:
    import threading

    from http_bench import run_wrk

    rng = random.Random(4)
    bodies = root / "curve-bodies.jsonl"
    bodies.write_text("".join(json.dumps({"tokens": [rng.randrange(50000) for _ in range(CHUNK * 8)]}) + "\n"
                              for _ in range(256)))
    points = []
    for n in range(1, most + 1):
        group = [Replica(root, f"curve{n}-{i}", url, pin_core=i if pin else None) for i in range(n)]
        try:
            for r in group:
                r.start()
            results: list[dict] = [{} for _ in group]

            def drive(i: int, r: Replica) -> None:
                assert r.proc is not None
                results[i] = run_wrk(r.port, 8, 5, 1, bodies, server_pid=r.proc.pid, pin_core=most + i if pin else None)

            threads = [threading.Thread(target=drive, args=(i, r)) for i, r in enumerate(group)]
            for t in threads:
                t.start()
            asyncio.run(publish(url, 2000 * 5, 16, 2000.0, 20 + n, start_n))
            start_n += 2000 * 5
            for t in threads:
                t.join()
            lags = [(r.healthz() or {}).get("lag_ms", {}).get("p99") for r in group]
            points.append({"replicas": n, "requests_per_s": round(sum(x["rps"] for x in results)),
                           "per_replica_requests_per_s": [round(x["rps"]) for x in results],
                           "replica_cpu_cores": [round(x["server_cpu_cores"], 2) for x in results],
                           "lag_p99_ms": lags, "errors": sum(x["errors"] for x in results)})
            log(str(points[-1]))
        finally:
            for r in group:
                r.stop()
    return points


def write_latency(holdings: int, calls: int = 50_000, keys_per_call: int = 16) -> dict:
    rng = random.Random(9)
    index = Index(CHUNK)
    for start in range(0, holdings, 100_000):
        keys = [rng.getrandbits(64) | 1 for _ in range(min(100_000, holdings - start))]
        index.apply_batch([("admit", "inst0", 0, "LocalCPUBackend", keys)])
    batches = [[rng.getrandbits(64) | 1 for _ in range(keys_per_call)] for _ in range(calls)]
    times = []
    for keys in batches:
        t = time.perf_counter()
        index.apply_batch([("admit", "inst0", 0, "LocalCPUBackend", keys)])
        times.append(time.perf_counter() - t)
    times.sort()

    def ms(q: float) -> float:
        return round(times[min(len(times) - 1, int(len(times) * q))] * 1e3, 3)

    return {"calls": calls, "keys_per_call": keys_per_call, "holdings_before": holdings,
            "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": round(times[-1] * 1e3, 3)}


async def lookups_for(port: int, seconds: float, prompts: list[list[int]]) -> int:
    bodies = [("POST /lookup HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(b)).encode() + b
              for b in (json.dumps({"tokens": p}).encode() for p in prompts)]

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        done = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            writer.write(b"".join(bodies[:64]))
            for _ in range(64):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            done += 64
            bodies.append(bodies.pop(0))
        writer.close()
        return done

    return sum(await asyncio.gather(one(), one()))


async def lookup_cost(replica: Replica, url: str, follow_rate_per_s: float | None, start_n: int) -> dict:
    rng = random.Random(3)
    prompts = [[rng.randrange(50000) for _ in range(CHUNK * 8)] for _ in range(256)]
    assert replica.proc is not None
    c0 = cpu_seconds(replica.proc.pid)
    tasks = [lookups_for(replica.port, 5.0, prompts)]
    if follow_rate_per_s:
        tasks.append(publish(url, int(follow_rate_per_s * 5), 16, follow_rate_per_s, 11, start_n))
    results = await asyncio.gather(*tasks)
    cpu = cpu_seconds(replica.proc.pid) - c0
    return {"lookups": results[0], "replica_cpu_s": round(cpu, 2), "lookups_per_cpu_s": round(results[0] / cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--holdings", type=int, default=2_000_000)
    ap.add_argument("--rate", type=float, default=10_000.0, help="messages/s for the lag measurement")
    ap.add_argument("--curve", type=int, default=0, metavar="N", help="measure the 1..N-replica lookup curve")
    ap.add_argument("--pin", action="store_true", help="with --curve: pin each replica and its wrk to cores")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "replicas.json"))
    args = ap.parse_args()
    res: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": loadavg(),
                 "quiet": wait_quiet(30)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nats = Nats(root)
        replicas: list[Replica] = []
        try:
            msgs = args.holdings // 1000
            log(f"publishing {msgs} messages x 1000 keys")
            res["publish_s"] = round(asyncio.run(publish(nats.url, msgs, 1000, None, 1, 1)), 2)
            log("follow rate")
            res["follow"] = asyncio.run(follow_rate(nats.url, args.holdings))
            log(str(res["follow"]))
            a = Replica(root, "a", nats.url, "--snapshot", str(root / "snap-a"), "--snapshot-interval", "2")
            replicas.append(a)
            res["replica_a_first_start_s"] = round(a.start(), 2)
            deadline = time.monotonic() + 120
            while not (a.healthz() or {}).get("snapshot_leader") or not _purged(nats.url):
                assert time.monotonic() < deadline, "no shared snapshot and purge"
                time.sleep(0.2)
            log("late join")
            b = Replica(root, "b", nats.url)
            replicas.append(b)
            res["late_join_s"] = round(b.start(), 2)
            res["late_join_origin"] = (b.healthz() or {}).get("origin")
            log("warm restart")
            a.kill9()
            asyncio.run(publish(nats.url, 200, 1000, None, 2, msgs + 1))
            res["warm_restart_s"] = round(a.start(), 2)
            res["warm_restart_origin"] = (a.healthz() or {}).get("origin")
            a.stop()
            b.stop()  # a fresh follower, C, alone from here: its lags are this phase's only
            c = Replica(root, "c", nats.url)
            replicas.append(c)
            c.start()
            log(f"lag at {args.rate:g} msgs/s")
            took = asyncio.run(publish(nats.url, int(args.rate * 5), 16, args.rate, 5, msgs + 201))
            time.sleep(1)
            state = c.healthz() or {}
            res["lag"] = {"target_msgs_per_s": args.rate, "achieved_msgs_per_s": round(args.rate * 5 / took),
                          **state.get("lag_ms", {})}
            log(str(res["lag"]))
            start_n = msgs + 201 + int(args.rate * 5)
            log("lookups without follow load")
            res["lookups_idle"] = asyncio.run(lookup_cost(c, nats.url, None, start_n))
            log("lookups with follow load")
            res["lookups_following"] = asyncio.run(lookup_cost(c, nats.url, 2000.0, start_n))
            res["lookups_following_ratio"] = round(res["lookups_following"]["lookups_per_cpu_s"]
                                                   / res["lookups_idle"]["lookups_per_cpu_s"], 3)
            log("write latency (in process)")
            res["write_latency"] = write_latency(args.holdings)
            log(str(res["write_latency"]))
            if args.curve:
                log(f"replica curve, 1..{args.curve} replicas")
                res["curve"] = replica_curve(root, nats.url, args.curve, args.pin, start_n + 10_000)
        finally:
            for r in replicas:
                r.stop()
            nats.stop()
    res["loadavg_end"] = loadavg()
    write_json(args.out, res)
    print(json.dumps(res, indent=1))


def _purged(url: str) -> bool:
    async def first() -> int:
        import nats

        nc = await nats.connect(url)
        try:
            return (await nc.jetstream().stream_info(STREAM)).state.first_seq
        finally:
            await nc.close()

    return asyncio.run(first()) > 1


if __name__ == "__main__":
    main()
