"""Soak: the controller with several real workers admitting and evicting while clients look up.

    python benchmarks/soak.py                       # 10 minutes (make soak)
    python benchmarks/soak.py --duration 30         # the test suite's short run
    python benchmarks/soak.py --json out.json       # also write every sample as JSON

What runs, all on 127.0.0.1:

* ``lmcache_controller`` (a subprocess; its RSS is what must stay flat);
* ``--workers`` real workers (``lmcache_rs.worker.KVWorker``, one process each, this script's
  ``worker`` subcommand): each stores prompts drawn from a shared pool at ``--store-rate`` per
  second into a CPU pool too small for all of them, so LRU evictions run all the time, and
  evicts a random prompt now and then; every admit and evict goes to the controller as
  ``events`` frames;
* ``--clients`` keep-alive HTTP connections sending ``POST /lookup`` of prompts from the same
  pool, ``--lookup-rate`` per second in all.

Every ``--interval`` seconds one line: lookups, errors, p50/p99 lookup latency (client side,
loopback), controller RSS, index chunks/holdings, keys admitted/evicted per second. Passes
(exit 0) when there was no error of any kind (non-200, connection error, a worker or the
controller exiting or logging an ERROR/Traceback, a resync) and the controller's RSS after
warm-up (the first ``--warmup`` fraction of the run) stays within +-``--rss-tolerance`` of its
value at the end of warm-up. Exit 1 otherwise, saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 16
SHAPE = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 4, "kv_dtype": "float16"}
SLOT_BYTES = SHAPE["num_layers"] * 2 * CHUNK * SHAPE["num_kv_heads"] * SHAPE["head_dim"] * 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the prompt pool every worker and client shares -------------------------------------------
def prompt_pool(size: int = 240, seed: int = 2024) -> list[list[int]]:
    """Prompts with shared prefixes (8 system prompts of 4 chunks) and their own suffixes."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 50000) for _ in range(4 * CHUNK)] for _ in range(8)]
    pool = []
    for i in range(size):
        suffix = [rng.randrange(1, 50000) for _ in range(rng.randrange(1, 7) * CHUNK + rng.randrange(CHUNK))]
        pool.append(systems[i % len(systems)] + suffix)
    return pool


def query_set(n: int, seed: int = 7) -> list[list[int]]:
    """Fixed lookups: pool prompts, their prefixes, and misses."""
    rng = random.Random(seed)
    pool = prompt_pool()
    out = []
    for i in range(n):
        p = pool[rng.randrange(len(pool))]
        kind = i % 4
        if kind == 0:
            out.append(p)
        elif kind == 1:
            out.append(p[: rng.randrange(1, len(p) + 1)])
        elif kind == 2:
            out.append(p + [rng.randrange(50000) for _ in range(rng.randrange(1, 40))])
        else:
            out.append([rng.randrange(50000) for _ in range(rng.randrange(1, 120))])
    return out


# -- processes ------------------------------------------------------------------------------
def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("LMCACHE_CONFIG_FILE", None)
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    return env


_LISTENING = re.compile(r"listening: http=\S*?:(\d+)\S* monitor=\S*?:(\d+)")


class LoggedProcess:
    """A child process whose output goes to a log file; stop = SIGTERM, then kill -9."""

    proc: subprocess.Popen | None = None
    log_path: Path
    stop_timeout: float = 10.0

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def errors_logged(self) -> list[str]:
        return [line for line in self.log().splitlines() if " ERROR " in line or "Traceback" in line]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9."""
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float | None = None) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Controller(LoggedProcess):
    """``lmcache_controller`` on 127.0.0.1; ``start()`` again after ``kill()`` reuses its ports."""

    def __init__(self, workdir: Path, *args: str, heartbeat_timeout: float = 3.0, env: dict | None = None,
                 host: str | None = "127.0.0.1"):
        self.workdir = workdir
        self.host = host
        self.args = list(args)
        self.heartbeat_timeout = heartbeat_timeout
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.http_port = 0
        self.monitor_port = 0
        self.log_path = workdir / "controller.log"
        self.starts = 0

    def start(self, timeout: float = 20.0) -> float:
        """Start and wait until it listens; returns the seconds that took."""
        cmd = [sys.executable, "-m", "lmcache_rs.controller", *(["--host", self.host] if self.host else []),
               "--port", str(self.http_port), "--monitor-port", str(self.monitor_port),
               "--chunk-size", str(CHUNK), "--heartbeat-interval", str(self.heartbeat_timeout / 6),
               "--heartbeat-timeout", str(self.heartbeat_timeout), *self.args]
        env = child_env()
        env.update(self.env)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        self.starts += 1
        while time.monotonic() - t0 < timeout:
            m = _LISTENING.search(self.log()[offset:])
            if m:
                self.http_port, self.monitor_port = int(m.group(1)), int(m.group(2))
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"controller did not start in {timeout} s:\n{self.log()[-3000:]}")


class Worker(LoggedProcess):
    """A real worker process (this script's ``worker`` subcommand)."""

    stop_timeout = 15.0

    def __init__(self, workdir: Path, monitor_port: int, instance: str, worker_id: int = 0, *,
                 store_rate: float = 20.0, churn: bool = True, capacity_chunks: int = 400, seed: int = 0,
                 api_key: str | None = None):
        self.instance, self.worker_id = instance, worker_id
        self.log_path = workdir / f"worker-{instance}-{worker_id}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--monitor-port", str(monitor_port),
               "--instance", instance, "--worker-id", str(worker_id), "--store-rate", str(store_rate),
               "--capacity-chunks", str(capacity_chunks), "--seed", str(seed)]
        if not churn:
            cmd.append("--no-churn")
        if api_key is not None:
            cmd += ["--api-key", api_key]
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env())
        out.close()

    def wait_ready(self, timeout: float = 60.0) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            for line in self.log().splitlines():
                if line.startswith("soak-worker ready "):
                    try:  # the JSON, whatever another thread's output may have put after it
                        return json.JSONDecoder().raw_decode(line[len("soak-worker ready "):])[0]
                    except ValueError:
                        break  # not all written yet: read the log again
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"worker not ready in {timeout} s:\n{self.log()[-3000:]}")


# -- HTTP -----------------------------------------------------------------------------------
class Http:
    """One keep-alive HTTP/1.1 connection (asyncio streams)."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> "Http":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                      timeout: float = 10.0) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        for k, v in (headers or {}).items():
            head += f"{k}: {v}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        return await asyncio.wait_for(self._response(), timeout)

    async def _response(self) -> tuple[int, bytes]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        return status, await self.reader.readexactly(length)

    async def lookup(self, tokens: list[int]) -> dict:
        status, body = await self.request("POST", "/lookup", json.dumps({"tokens": tokens}).encode())
        if status != 200:
            raise RuntimeError(f"/lookup answered {status}: {body[:200]!r}")
        out = json.loads(body)
        return out["layout_info"]


async def metrics(port: int) -> dict[str, float]:
    """The controller's /metrics as {name{labels}: value}."""
    http = await Http(port).open()
    try:
        status, body = await http.request("GET", "/metrics")
    finally:
        await http.close()
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# -- the worker subcommand ------------------------------------------------------------------
def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="soak.py worker")
    p.add_argument("--monitor-port", type=int, required=True)
    p.add_argument("--instance", required=True)
    p.add_argument("--worker-id", type=int, default=0)
    p.add_argument("--store-rate", type=float, default=20.0, help="prompts stored per second")
    p.add_argument("--capacity-chunks", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-churn", action="store_true", help="store the first prompts once, then only heartbeat")
    p.add_argument("--api-key")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lmcache_rs.config import GB, config_from_dict
    from lmcache_rs.worker import KVWorker, synthetic_kv

    config = {
        "chunk_size": CHUNK, **SHAPE, "max_local_cpu_size": args.capacity_chunks * SLOT_BYTES / GB,
        "enable_controller": True, "controller_pull_url": f"127.0.0.1:{args.monitor_port}",
        "lmcache_instance_id": args.instance, "lmcache_worker_ports": 0, "lmcache_worker_host": "127.0.0.1",
        "p2p_init_ports": 0, "p2p_host": "127.0.0.1", "report_interval": 0.02,
    }
    if args.api_key is not None:
        config["controller_api_key"] = args.api_key
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    worker = KVWorker(config_from_dict(config), args.worker_id)
    rng = random.Random(args.seed * 1000 + args.worker_id)
    pool = prompt_pool()
    stores = evicts = 0
    try:
        if args.no_churn:  # a fixed holding: the first prompts of the pool that fit
            for prompt in pool[: args.capacity_chunks // 8]:
                worker.store(prompt, synthetic_kv(prompt, **_shape()))
                stores += 1
        # one write: unbuffered, print() writes the text and its newline apart, and a log line
        # from the reporting thread can land between them
        sys.stdout.write("soak-worker ready " + json.dumps({"instance": args.instance, "worker_id": args.worker_id,
                                                            "chunks": worker.health()["chunks"]}) + "\n")
        sys.stdout.flush()
        period = 1.0 / args.store_rate if args.store_rate > 0 else 1.0
        next_at = time.monotonic()
        while not stop:
            if not args.no_churn:
                # zipf-ish: low indices are hot, the tail keeps the LRU pool evicting
                prompt = pool[min(len(pool) - 1, int(rng.paretovariate(1.2)) - 1 + rng.randrange(8))]
                if rng.random() < 0.1:
                    evicts += 1
                    worker.evict(pool[rng.randrange(len(pool))])
                else:
                    stores += 1
                    worker.store(prompt, synthetic_kv(prompt, **_shape()))
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()
    finally:
        worker.close()
        print("soak-worker done " + json.dumps({"stores": stores, "evicts": evicts}), flush=True)
    return 0


_SHAPE_KW: dict = {}


def _shape() -> dict:
    if _SHAPE_KW:
        return _SHAPE_KW
    import torch

    _SHAPE_KW.update({"num_layers": SHAPE["num_layers"], "num_kv_heads": SHAPE["num_kv_heads"], "head_dim": SHAPE["head_dim"],
            "dtype": getattr(torch, SHAPE["kv_dtype"])})
    return _SHAPE_KW


# -- the soak -------------------------------------------------------------------------------
class Load:
    """Clients sending lookups at a fixed total rate; latencies and errors per interval."""

    def __init__(self, port: int, clients: int, rate: float, queries: list[list[int]]):
        self.port, self.clients, self.rate, self.queries = port, clients, rate, queries
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.count = 0
        self.stopping = False

    async def run(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.clients)))

    async def _client(self, i: int) -> None:
        http = Http(self.port)
        period = self.clients / self.rate
        rng = random.Random(i)
        next_at = time.monotonic() + rng.random() * period
        try:
            while not self.stopping:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at + period, time.monotonic() - period)
                body = json.dumps({"tokens": self.queries[rng.randrange(len(self.queries))]}).encode()
                t0 = time.perf_counter()
                try:
                    status, data = await http.request("POST", "/lookup", body)
                    if status != 200:
                        self.errors.append(f"/lookup {status}: {data[:120]!r}")
                    else:
                        self.latencies.append(time.perf_counter() - t0)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.errors.append(f"client {i}: {type(exc).__name__}: {exc}")
                    await http.close()
                self.count += 1
        finally:
            await http.close()

    def take(self) -> tuple[list[float], int]:
        lat, self.latencies = sorted(self.latencies), []
        return lat, len(lat)


async def soak(args: argparse.Namespace) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="lmcache-soak-"))
    controller = Controller(workdir, heartbeat_timeout=args.heartbeat_timeout)
    controller.start()
    log(f"controller pid {controller.proc.pid} http={controller.http_port} monitor={controller.monitor_port}; "
        f"logs in {workdir}")
    workers = [Worker(workdir, controller.monitor_port, f"soak-{i}", store_rate=args.store_rate,
                      capacity_chunks=args.capacity_chunks, seed=i) for i in range(args.workers)]
    samples: list[dict] = []
    problems: list[str] = []
    load = None
    try:
        for w in workers:
            w.wait_ready()
        log(f"{len(workers)} workers ready; {args.clients} clients at {args.lookup_rate:g} lookups/s "
            f"for {args.duration:g} s")
        load = Load(controller.http_port, args.clients, args.lookup_rate, query_set(1000))
        load_task = asyncio.ensure_future(load.run())
        t0 = time.monotonic()
        prev = await metrics(controller.http_port)
        prev_t = t0
        print(f"{'t_s':>6} {'lookups':>8} {'errors':>6} {'p50_ms':>7} {'p99_ms':>7} {'rss_MB':>7} "
              f"{'chunks':>7} {'holdings':>8} {'admit/s':>8} {'evict/s':>8}", flush=True)
        while time.monotonic() - t0 < args.duration:
            await asyncio.sleep(min(args.interval, max(0.0, args.duration - (time.monotonic() - t0))))
            now = time.monotonic()
            lat, n = load.take()
            if not controller.alive():
                problems.append(f"controller exited with {controller.proc.returncode}")
                break
            m = await metrics(controller.http_port)
            dt = now - prev_t
            admit_key = 'lmcache_ingest_keys_total{op="admit"}'
            evict_key = 'lmcache_ingest_keys_total{op="evict"}'
            sample = {
                "t_s": round(now - t0, 1), "lookups": n, "errors": len(load.errors),
                "p50_ms": round(percentile(lat, 0.5) * 1e3, 3), "p99_ms": round(percentile(lat, 0.99) * 1e3, 3),
                "rss_mb": round(rss_kb(controller.proc.pid) / 1024, 1),
                "chunks": int(m.get("lmcache_index_chunks", 0)), "holdings": int(m.get("lmcache_index_holdings", 0)),
                "admit_per_s": round((m.get(admit_key, 0) - prev.get(admit_key, 0)) / dt),
                "evict_per_s": round((m.get(evict_key, 0) - prev.get(evict_key, 0)) / dt),
                "resyncs": int(m.get("lmcache_resyncs_total", 0)),
            }
            prev, prev_t = m, now
            samples.append(sample)
            print(f"{sample['t_s']:>6} {n:>8} {len(load.errors):>6} {sample['p50_ms']:>7.2f} {sample['p99_ms']:>7.2f} "
                  f"{sample['rss_mb']:>7.1f} {sample['chunks']:>7} {sample['holdings']:>8} "
                  f"{sample['admit_per_s']:>8} {sample['evict_per_s']:>8}", flush=True)
            for w in workers:
                if not w.alive():
                    problems.append(f"worker {w.instance} exited with {w.proc.returncode}")
            if any(p.startswith("worker") for p in problems):
                break
        load.stopping = True
        await asyncio.wait_for(load_task, 15)
    finally:
        if load is not None:
            load.stopping = True
        for w in workers:
            w.stop()
        code = controller.stop()
    if code != 0:
        problems.append(f"controller exit status {code} on SIGTERM")
    if load is not None and load.errors:
        problems.append(f"{len(load.errors)} lookup errors, first: {load.errors[0]}")
    for source in [controller] + workers:
        errs = source.errors_logged()
        if errs:
            problems.append(f"{source.log_path.name}: {len(errs)} ERROR/Traceback lines, first: {errs[0][:200]}")
    if samples and samples[-1]["resyncs"]:
        problems.append(f"{samples[-1]['resyncs']} resyncs (sequence gaps) without any fault injected")
    if samples and sum(s["admit_per_s"] for s in samples) == 0:
        problems.append("the workers admitted nothing")
    warm = [s for s in samples if s["t_s"] > args.warmup * args.duration]
    rss = {}
    if len(warm) >= 2:
        base = warm[0]["rss_mb"]
        lo, hi = min(s["rss_mb"] for s in warm), max(s["rss_mb"] for s in warm)
        rss = {"after_warmup_mb": base, "min_mb": lo, "max_mb": hi,
               "max_dev_pct": round(100 * max(hi - base, base - lo) / base, 1)}
        if rss["max_dev_pct"] > 100 * args.rss_tolerance:
            problems.append(f"controller RSS moved {rss['max_dev_pct']}% after warm-up ({lo}-{hi} MB, "
                            f"{base} MB at the end of warm-up)")
    else:
        problems.append("too few samples after warm-up to judge RSS")
    total = sum(s["lookups"] for s in samples)
    all_p99 = [s["p99_ms"] for s in samples]
    summary = {
        "duration_s": args.duration, "workers": args.workers, "clients": args.clients,
        "lookup_rate": args.lookup_rate, "store_rate_per_worker": args.store_rate,
        "lookups": total, "errors": len(load.errors) if load else None, "rss": rss,
        "p50_ms_median": round(sorted(s["p50_ms"] for s in samples)[len(samples) // 2], 3) if samples else None,
        "p99_ms_max": max(all_p99) if all_p99 else None,
        "keys_admitted": sum(s["admit_per_s"] for s in samples) * args.interval,
        "problems": problems, "samples": samples, "logs": str(workdir),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds (default %(default)s)")
    p.add_argument("--interval", type=float, default=None, help="seconds per sample (default duration/20, 3-30)")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--lookup-rate", type=float, default=400.0, help="lookups per second, all clients")
    p.add_argument("--store-rate", type=float, default=40.0, help="prompts stored per second per worker")
    p.add_argument("--capacity-chunks", type=int, default=200, help="CPU pool of each worker, in chunks")
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of the run before RSS is judged")
    p.add_argument("--rss-tolerance", type=float, default=0.10)
    p.add_argument("--json", help="write the summary and every sample here")
    args = p.parse_args(argv)
    if args.interval is None:
        args.interval = min(30.0, max(3.0, args.duration / 20))
    summary = asyncio.run(soak(args))
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if summary["problems"]:
        for problem in summary["problems"]:
            log(f"FAIL: {problem}")
        return 1
    log("PASS: no errors, controller RSS flat after warm-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
