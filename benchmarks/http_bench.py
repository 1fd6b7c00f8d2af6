"""HTTP benchmark: our lmcache_controller beside LMCache's own controller, same run, same tokens.

    .venv/bin/python benchmarks/http_bench.py            # both controllers, then one table

For each controller in turn (never both at once; loopback only, ports picked free):
1. start it: ours from .venv (``lmcache_controller --host 127.0.0.1 --port P
   --monitor-port M``); LMCache's from .bench-venv (``lmcache_controller --host 127.0.0.1
   --port P --monitor-ports '{"pull": A, "reply": B}'``, PYTHONHASHSEED=0);
2. populate it the way its workers do: ours with benchmarks/synthetic_worker.py (hello,
   full sync over the monitor port, heartbeats while the load runs), LMCache's with
   benchmarks/anchors/lmcache_populate.py (RegisterMsg over DEALER/ROUTER, batched
   KV admit messages over PUSH/PULL, LMCache's own message classes). Both hold the same
   prompts (benchmarks/workload.py http_workload: 4 instances x 512 prompts of 4096
   tokens, 256-token chunks) and both are checked against the expected answers;
3. wrk (-s benchmarks/lookup.lua) POSTs /lookup bodies rotating over the same 256
   queries (4096 tokens each; half hit a held prefix of 1-16 chunks, half miss) at 1 and
   at 8 connections, after a short warm-up: requests/s, p50, p99, and the server's CPU
   use; --repeats runs each, the one with the most requests/s reported (the machine is
   shared; every run is in the JSON);
4. end-to-end chunk admits/s: fresh workers send --admits admits (random keys) through
   the worker channel, timed until the controller has applied them all (ours: the
   ping/pong barrier; LMCache: a probe prompt sent last becomes visible to /lookup).

With ``--nginx`` (needs Debian's nginx), nginx answering every POST /lookup with a fixed
reply (``return 200``, one worker process) takes the same wrk runs: the transport's cost alone,
the ceiling an HTTP server in front of the index can approach. With ``--pin`` every server
runs on core 0 (``taskset -c 0``) and wrk on core 1, so that server and client do not take
each other's core.

The driver writes benchmarks/results/http_bench.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ANCHOR_PY,
    BENCH_DIR,
    OUR_PY,
    RESULTS_DIR,
    ROOT,
    cpu_times,
    fmt,
    free_port,
    loadavg,
    log,
    machine,
    publish,
    stop,
    table,
    wait_quiet,
)
import workload as wlmod  # noqa: E402

TARGETS = {"rps_ratio_c8": 25.0, "p99_us_c8": 1000.0, "p50_us_c1": 100.0, "e2e_admits_per_s": 1e6}
LUA = BENCH_DIR / "lookup.lua"
# --pin: servers on core 0, wrk on core 1 (set by the driver)
SERVER_PIN: list[str] = []
CLIENT_PIN: list[str] = []
# nginx's fixed reply: an answer of the size /lookup gives for one instance
NGINX_REPLY = '{"event_id": "Lookup-00000000-1", "layout_info": {"inst-0": ["LocalCPUBackend", 1024]}, ' \
              '"inst-0": ["LocalCPUBackend", 1024]}'
NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = /lookup {{ default_type application/json; return 200 '{reply}'; }}
    }}
}}
"""
POPULATE = BENCH_DIR / "anchors" / "lmcache_populate.py"
WORKER = BENCH_DIR / "synthetic_worker.py"




def http_post(port: int, path: str, body: dict, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(port: int, proc: subprocess.Popen, timeout: float, what: str) -> float:
    t0 = time.perf_counter()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        try:
            status, _ = http_post(port, "/lookup", {"tokens": [1, 2, 3]}, timeout=1)
            if status == 200:
                return time.perf_counter() - t0
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer /lookup within {timeout}s")






def run_wrk(port: int, connections: int, duration: float, threads: int, bodies: Path,
            server_pid: int | None = None, pin_core: int | None = None) -> dict:
    cmd = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
           "--timeout", "10s", "-s", str(LUA), f"http://127.0.0.1:{port}", "--", str(bodies)]
    cmd = (CLIENT_PIN if pin_core is None else ["taskset", "-c", str(pin_core)]) + cmd
    cpu0 = cpu_times(server_pid) if server_pid else None
    load0 = loadavg()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"^WRKJSON (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stdout[-2000:]} {p.stderr[-2000:]}")
    res = json.loads(m.group(1))
    res["cmd"] = " ".join(cmd)
    res["loadavg_before"] = load0
    if server_pid:
        user, system = (after - before for after, before in zip(cpu_times(server_pid), cpu0))
        res["server_cpu_cores"] = (user + system) / res["duration_s"]
        res["server_user_cores"], res["server_system_cores"] = user / res["duration_s"], system / res["duration_s"]
    wrk_cpu = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    res["wrk_cpu_cores"] = wrk_cpu / res["duration_s"]
    res["errors"] = sum(res[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return res


def load_phase(name: str, port: int, server_pid: int, args, bodies: Path) -> dict:
    """wrk at 1 and 8 connections, --repeats runs each; the run with the most requests/s
    stands for the configuration (the others were slowed by other work on the shared
    machine). Every run is kept in the JSON."""
    out = {}
    log(f"{name}: warm-up {args.warmup}s")
    run_wrk(port, 8, args.warmup, args.wrk_threads, bodies, server_pid)
    for c in (1, 8):
        runs = []
        for r in range(args.repeats):
            x = run_wrk(port, c, args.duration, args.wrk_threads, bodies, server_pid)
            log(f"{name}: c{c} run {r + 1}/{args.repeats}: {x['rps']:.0f} req/s, p50 {x['p50_us']:.0f} us, "
                f"p99 {x['p99_us']:.0f} us, server {x.get('server_cpu_cores', 0):.2f} cores, "
                f"wrk {x['wrk_cpu_cores']:.2f} cores, errors {x['errors']}")
            runs.append(x)
        best = dict(max(runs, key=lambda x: x["rps"]))
        best["runs"] = [{k: x[k] for k in ("rps", "p50_us", "p99_us", "server_cpu_cores", "server_user_cores", "server_system_cores",
                                           "wrk_cpu_cores", "loadavg_before", "errors")
                         if k in x} for x in runs]
        best["errors_all_runs"] = sum(x["errors"] for x in runs)
        out[f"c{c}"] = best
    return out


def wl_args(args) -> list[str]:
    return ["--seed", str(args.seed), "--instances", str(args.instances), "--prompts", str(args.prompts),
            "--prompt-tokens", str(args.prompt_tokens), "--queries", str(args.queries)]


# --------------------------------------------------------------------------------------


def bench_ours(args, bodies: Path) -> dict:
    quiet = wait_quiet(args.quiet_wait)
    exe = ROOT / ".venv" / "bin" / "lmcache_controller"
    http, mon = free_port(), free_port()
    cmd = [str(exe), "--host", "127.0.0.1", "--port", str(http), "--monitor-port", str(mon),
           "--log-level", "WARNING", *args.ours_args.split()]
    cmd = SERVER_PIN + cmd
    log(f"ours: starting {' '.join(cmd)}")
    ctl = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=sys.stderr)
    worker = None
    res: dict = {"controller_cmd": " ".join(cmd), "quiet": quiet}
    try:
        res["startup_s"] = wait_http(http, ctl, 30, "our controller")
        worker = subprocess.Popen(
            [str(OUR_PY), str(WORKER), "--phase", "populate", "--monitor", f"127.0.0.1:{mon}",
             "--http", f"127.0.0.1:{http}", *wl_args(args)],
            cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert worker.stdout is not None
        line = worker.stdout.readline()
        if not line:
            raise RuntimeError(f"synthetic worker exited ({worker.wait()}) before it was ready")
        res["populate"] = json.loads(line)
        log(f"ours: populated; {res['populate']['agree']}/{res['populate']['checked']} answers as expected")
        res["load"] = load_phase("ours", http, ctl.pid, args, bodies)
        log(f"ours: end-to-end admits ({args.admits:,})")
        p = subprocess.run([str(OUR_PY), str(WORKER), "--phase", "e2e", "--monitor", f"127.0.0.1:{mon}",
                            "--http", f"127.0.0.1:{http}", "--admits", str(args.admits), *wl_args(args)],
                           cwd=str(ROOT), capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"e2e phase failed: {p.stderr[-2000:]}")
        res["e2e"] = json.loads(p.stdout.strip().splitlines()[-1])
        log(f"ours: e2e {res['e2e']['admits_per_s'] / 1e6:.2f} M admits/s")
    finally:
        if worker is not None and worker.poll() is None:
            assert worker.stdin is not None
            worker.stdin.close()
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        stop(ctl, "our controller")
    return res


def bench_lmcache(args, bodies: Path) -> dict:
    quiet = wait_quiet(args.quiet_wait)
    exe = ROOT / ".bench-venv" / "bin" / "lmcache_controller"
    http, pull, reply = free_port(), free_port(), free_port()
    ports = json.dumps({"pull": pull, "reply": reply})
    cmd = SERVER_PIN + [str(exe), "--host", "127.0.0.1", "--port", str(http), "--monitor-ports", ports]
    env = dict(os.environ, PYTHONHASHSEED=str(args.hashseed))
    log(f"lmcache: starting {' '.join(cmd)} (PYTHONHASHSEED={args.hashseed})")
    ctl = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res: dict = {"controller_cmd": f"PYTHONHASHSEED={args.hashseed} {' '.join(cmd)}", "quiet": quiet}
    try:
        res["startup_s"] = wait_http(http, ctl, 120, "LMCache's controller")
        common = ["--pull", f"127.0.0.1:{pull}", "--reply", f"127.0.0.1:{reply}", "--http", f"127.0.0.1:{http}"]
        p = subprocess.run([str(ANCHOR_PY), str(POPULATE), *common, *wl_args(args)], env=env, cwd=str(ROOT),
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"lmcache_populate failed: {p.stderr[-3000:]}")
        res["populate"] = json.loads(p.stdout)
        log(f"lmcache: populated; {res['populate']['agree']}/{res['populate']['checked']} answers as expected")
        res["load"] = load_phase("lmcache", http, ctl.pid, args, bodies)
        log(f"lmcache: end-to-end admits ({args.admits:,})")
        p = subprocess.run([str(ANCHOR_PY), str(POPULATE), "--phase", "e2e", "--admits", str(args.admits),
                            *common, *wl_args(args)], env=env, cwd=str(ROOT), capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"lmcache e2e failed: {p.stderr[-3000:]}")
        res["e2e"] = json.loads(p.stdout)
        log(f"lmcache: e2e {res['e2e']['admits_per_s'] / 1e6:.2f} M admits/s")
    finally:
        stop(ctl, "LMCache's controller")
    v = subprocess.run([str(ANCHOR_PY), "-c", "import importlib.metadata as m; print(m.version('lmcache'))"],
                       capture_output=True, text=True)
    res["version"] = v.stdout.strip()
    return res


def bench_nginx(args, bodies: Path) -> dict:
    import tempfile

    quiet = wait_quiet(args.quiet_wait)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="http_bench_nginx_"))
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port, reply=NGINX_REPLY))
    cmd = SERVER_PIN + [shutil.which("nginx") or "nginx", "-p", str(workdir), "-c", str(conf)]
    log(f"nginx: starting {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    res: dict = {"server_cmd": " ".join(cmd), "quiet": quiet, "reply_bytes": len(NGINX_REPLY)}
    try:
        res["startup_s"] = wait_http(port, proc, 30, "nginx")
        pid = int((workdir / "nginx.pid").read_text())
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        res["load"] = load_phase("nginx", port, int(children[0]) if children else pid, args, bodies)
    finally:
        stop(proc, "nginx")
        shutil.rmtree(workdir, ignore_errors=True)
    v = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    res["version"] = v.stderr.strip().split("/")[-1]
    return res


# --------------------------------------------------------------------------------------


def inproc_breakdown(wl, bodies: Path) -> dict:
    """Where a request's in-process time goes, on the same bodies, in this process (µs per
    body, best of 5 passes):

    - ``lookup_json_us``: ``Index.lookup_json`` on the benchmark's index, all of it;
    - ``parse_us``: ``lookup_json`` on an empty index: the body checked whole, then the walk
      stops at the first chunk (two chunks' numbers read and hashed, ``{}`` rendered). The
      numbers of the chunks a lookup goes on to hash are read as it hashes them, so that part
      of the parse is counted in ``hash_walk_render_us``;
    - ``hash_walk_render_us``: ``lookup_json_us - parse_us``, the rest;
    - and for scale, each timed on its own through its Python binding: ``hash_us``,
      ``chunk_hashes`` of every chunk of the body's tokens from numpy (an upper bound: a walk
      that stops at a miss hashes one chunk past it), and ``walk_us``, ``lookup_keys`` on
      those keys computed beforehand (the walk and its answer as a dict, no hashing);
    - ``lookup_json_whole_hit_us``: ``lookup_json`` on an index that holds every body's whole
      prompt, so that every number of the body is read and every chunk hashed and walked.

    The server-side rest (HTTP and Python, and the kernel's system calls and TCP) comes from
    the server's CPU time during the wrk runs (``per_request_breakdown``)."""
    import numpy as np

    import lmcache_rs

    idx = lmcache_rs.Index(chunk_size=256, seed=0)
    for i, a in enumerate(wl.stored):
        for p in range(a.shape[0]):
            idx.admit(wlmod.instance_name(i), 0, wlmod.LOCATION, tokens=a[p])
    empty = lmcache_rs.Index(chunk_size=256, seed=0)
    raw = [line for line in bodies.read_bytes().splitlines() if line]
    tokens = [np.asarray(json.loads(b)["tokens"], dtype=np.uint32) for b in raw]
    keys = [np.asarray(lmcache_rs.chunk_hashes(t, 256, 0), dtype=np.uint64) for t in tokens]
    # the same bodies with another key ahead of "tokens" or after it (a client adding "model")
    other = [b'{"model": "m", ' + b[1:] for b in raw]
    after = [b[:-1] + b', "model": "m"}' for b in raw]

    def best_us(call, items) -> float:
        for x in items:
            call(x)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter_ns()
            for x in items:
                call(x)
            best = min(best, (time.perf_counter_ns() - t) / len(items) / 1e3)
        return best

    whole = lmcache_rs.Index(chunk_size=256, seed=0)
    for t in tokens:
        whole.admit("whole", 0, wlmod.LOCATION, tokens=t)
    full = best_us(lambda b: idx.lookup_json(b, "x"), raw)
    parse = best_us(lambda b: empty.lookup_json(b, "x"), raw)
    parts = {"parse_us": parse, "hash_walk_render_us": full - parse,
             "hash_us": best_us(lambda t: lmcache_rs.chunk_hashes(t, 256, 0), tokens),
             "walk_us": best_us(idx.lookup_keys, keys)}
    return {"lookup_json_us": full, **parts, "lookup_json_other_keys_us": best_us(lambda b: idx.lookup_json(b, "x"), other),
            "lookup_json_keys_after_us": best_us(lambda b: idx.lookup_json(b, "x"), after),
            "lookup_json_whole_hit_us": best_us(lambda b: whole.lookup_json(b, "x"), raw),
            "bodies": len(raw), "body_bytes_mean": sum(map(len, raw)) / len(raw), "single_core_ceiling_rps": 1e6 / full}


def per_request_breakdown(ours: dict) -> dict:
    """µs of server CPU per request at 8 connections, split: the in-process parts of
    ``inproc_breakdown``, the rest of the server's user time (HTTP parsing and writing, Python,
    the event loop) and its system time (system calls, the kernel's TCP work). CPU time, not
    latency: with the core saturated, 1e6 / (user + system) is the request rate."""
    run, ip = ours["load"]["c8"], ours["inproc"]
    user = run["server_user_cores"] * 1e6 / run["rps"]
    system = run["server_system_cores"] * 1e6 / run["rps"]
    return {"parse_us": ip["parse_us"], "hash_walk_render_us": ip["hash_walk_render_us"],
            "http_and_python_us": user - ip["lookup_json_us"], "system_us": system, "total_us": user + system,
            "hash_alone_us": ip["hash_us"], "walk_alone_us": ip["walk_us"]}


def ours_available() -> str | None:
    if not (ROOT / ".venv" / "bin" / "lmcache_controller").exists():
        return ".venv/bin/lmcache_controller missing (run make install)"
    p = subprocess.run([str(OUR_PY), "-c", "import lmcache_rs.controller.__main__, lmcache_rs; lmcache_rs.Index"],
                       capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1]


def verdict(ours: dict, lmc: dict) -> list[str]:
    t = TARGETS
    o8, l8 = ours["load"]["c8"], lmc["load"]["c8"]
    ratio = o8["rps"] / l8["rps"]
    p99 = o8["p99_us"]
    p50 = ours["load"]["c1"]["p50_us"]
    e2e = ours["e2e"]["admits_per_s"]

    def state(ok: bool, miss: str) -> str:
        return "MET" if ok else f"MISSED ({miss})"

    return [
        f"req/s at 8 connections {ratio:.1f}x LMCache's "
        + state(ratio >= t["rps_ratio_c8"], f"target {t['rps_ratio_c8']:.0f}x; short by "
                f"{(1 - ratio / t['rps_ratio_c8']) * 100:.0f}%"),
        f"p99 at 8 connections {p99:.0f} us " + state(p99 <= t["p99_us_c8"], f"over by {p99 - t['p99_us_c8']:.0f} us"),
        f"p50 at 1 connection {p50:.0f} us " + state(p50 <= t["p50_us_c1"], f"over by {p50 - t['p50_us_c1']:.0f} us"),
        f"end-to-end {e2e / 1e6:.2f} M admits/s "
        + state(e2e >= t["e2e_admits_per_s"], f"short by {(1 - e2e / t['e2e_admits_per_s']) * 100:.0f}%"),
    ]


def report(res: dict) -> str:
    m = res["machine"]
    ours, lmc = res.get("ours"), res.get("lmcache")
    lines = [f"machine: {m['nproc']} cores, {m['cpu']}, {m['ram_gib']} GiB; load average at start {m['loadavg_at_start']}",
             f"workload: {res['args']['instances']} instances x {res['args']['prompts']} prompts of "
             f"{res['args']['prompt_tokens']} tokens (256-token chunks); {res['args']['queries']} query bodies of "
             f"{res['args']['prompt_tokens']} tokens, half hits; wrk -t{res['args']['wrk_threads']}, "
             f"best of {res['args']['repeats']} runs of {res['args']['duration']}s after {res['args']['warmup']}s warm-up"]

    def v(side, f):
        return "pending" if side is None else f(side)

    rows = []
    for c in ("c1", "c8"):
        n = c[1:]
        rows.append([f"requests/s, {n} conn", v(ours, lambda s: fmt(s["load"][c]["rps"], 1)),
                     v(lmc, lambda s: fmt(s["load"][c]["rps"], 1)),
                     v(ours and lmc, lambda _: f"{ours['load'][c]['rps'] / lmc['load'][c]['rps']:.1f}x"),
                     ">= 25x LMCache" if c == "c8" else ""])
        for q in ("p50_us", "p99_us"):
            target = {("c1", "p50_us"): "<= 100 us", ("c8", "p99_us"): "<= 1000 us"}.get((c, q), "")
            rows.append([f"{q[:3]} latency, {n} conn (us)", v(ours, lambda s: f"{s['load'][c][q]:.0f}"),
                         v(lmc, lambda s: f"{s['load'][c][q]:.0f}"), "", target])
        rows.append([f"server / wrk CPU (cores), {n} conn",
                     v(ours, lambda s: f"{s['load'][c]['server_cpu_cores']:.2f} / {s['load'][c]['wrk_cpu_cores']:.2f}"),
                     v(lmc, lambda s: f"{s['load'][c]['server_cpu_cores']:.2f} / {s['load'][c]['wrk_cpu_cores']:.2f}"),
                     "", ""])
    rows.append(["end-to-end chunk admits/s", v(ours, lambda s: fmt(s["e2e"]["admits_per_s"], 2)),
                 v(lmc, lambda s: fmt(s["e2e"]["admits_per_s"], 2)),
                 v(ours and lmc, lambda _: f"{ours['e2e']['admits_per_s'] / lmc['e2e']['admits_per_s']:.1f}x"),
                 ">= 1 M/s"])
    rows.append(["answers as expected (sample)",
                 v(ours, lambda s: f"{s['populate']['agree']}/{s['populate']['checked']}"),
                 v(lmc, lambda s: f"{s['populate']['agree']}/{s['populate']['checked']}"), "", ""])
    rows.append(["errors during load (all runs)",
                 v(ours, lambda s: str(s["load"]["c1"]["errors_all_runs"] + s["load"]["c8"]["errors_all_runs"])),
                 v(lmc, lambda s: str(s["load"]["c1"]["errors_all_runs"] + s["load"]["c8"]["errors_all_runs"])), "", ""])
    lines.append(table(["measure", "lmcache_rs controller", f"LMCache {lmc['version']} controller" if lmc else "LMCache controller",
                        "ratio", "target"], rows))
    for name, side in (("ours", ours), ("lmcache", lmc)):
        if side and "quiet" in side:
            q = side["quiet"]
            loads = ", ".join(f"{c} " + "/".join(str(r["loadavg_before"][0]) for r in side["load"][c]["runs"])
                              for c in ("c1", "c8"))
            lines.append(f"{name}: other work used {q['cpu_busy_before'] * 100:.0f}% of the CPUs before its run "
                         f"(waited {q['waited_s']:.0f}s); 1-min load average before wrk: {loads}")
    ngx = res.get("nginx")
    if ngx:
        rows = []
        for c in ("c1", "c8"):
            n = c[1:]
            rows.append([f"requests/s, {n} conn", v(ours, lambda s: fmt(s["load"][c]["rps"], 1)),
                         fmt(ngx["load"][c]["rps"], 1),
                         v(ours, lambda s: f"{100 * s['load'][c]['rps'] / ngx['load'][c]['rps']:.0f} %"),
                         ">= 80 % of nginx" if c == "c8" else ""])
            rows.append([f"p99 latency, {n} conn (us)", v(ours, lambda s: f"{s['load'][c]['p99_us']:.0f}"),
                         f"{ngx['load'][c]['p99_us']:.0f}",
                         v(ours, lambda s: f"{s['load'][c]['p99_us'] / ngx['load'][c]['p99_us']:.2f}x"),
                         "<= 1.5x nginx" if c == "c8" else ""])
        lines.append(table(["measure", "lmcache_rs /lookup", f"nginx {ngx['version']} fixed reply", "ours / nginx",
                            "target"], rows))
    if ours and "inproc" in ours:
        ip = ours["inproc"]
        lines.append(f"breakdown: Index.lookup_json alone takes {ip['lookup_json_us']:.1f} us per body "
                     f"({ip['body_bytes_mean'] / 1e3:.1f} kB of JSON) in-process, a ceiling of "
                     f"{ip['single_core_ceiling_rps'] / 1e3:.1f} k req/s per core before any HTTP work; "
                     f"{ip['lookup_json_other_keys_us']:.1f} us with a \"model\" key ahead of \"tokens\", "
                     f"{ip['lookup_json_keys_after_us']:.1f} us with it after")
    if ours and "per_request" in ours:
        pr = ours["per_request"]
        names = [("parse the body", "parse_us"), ("hash, walk, render", "hash_walk_render_us"),
                 ("HTTP and Python (user CPU)", "http_and_python_us"),
                 ("system calls and TCP (system CPU)", "system_us")]
        rows = [[name, f"{pr[k]:.1f}", f"{100 * pr[k] / pr['total_us']:.0f} %"] for name, k in names]
        rows.append(["server CPU per request, 8 conn", f"{pr['total_us']:.1f}", "100 %"])
        rows.append(["(alone: hash every chunk / walk from keys)",
                     f"{pr['hash_alone_us']:.1f} / {pr['walk_alone_us']:.1f}", ""])
        lines.append(table(["part of a /lookup", "us per request", "share"], rows))
    if "verdict" in res:
        lines.append("targets: " + "; ".join(res["verdict"]))
    if "ours_pending" in res:
        lines.append(f"ours: pending ({res['ours_pending']})")
    return "\n".join(lines)


def driver(args) -> int:
    if shutil.which("wrk") is None and not args.breakdown_only:
        log("wrk not found: apt-get install -y wrk")
        return 2
    if args.pin:
        if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
            log("--pin needs two cores and taskset")
            return 2
        SERVER_PIN[:] = ["taskset", "-c", "0"]
        CLIENT_PIN[:] = ["taskset", "-c", "1"]
    res: dict = {"bench": "http_bench", "args": vars(args).copy(), "machine": machine(), "targets": TARGETS}
    res["args"].pop("out", None)
    res["args"].pop("quiet_wait", None)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    bodies = RESULTS_DIR / "http_bodies.jsonl"
    wl = wlmod.http_workload(seed=args.seed, instances=args.instances, prompts_per_instance=args.prompts,
                             prompt_tokens=args.prompt_tokens, chunk_size=256, queries=args.queries)
    with open(bodies, "w") as f:
        for toks, _ in wl.queries:
            f.write(json.dumps({"tokens": toks.tolist()}, separators=(",", ":")) + "\n")
    res["body_bytes_mean"] = bodies.stat().st_size / len(wl.queries)
    if args.breakdown_only:  # in process only: no servers, nothing published
        print(json.dumps(inproc_breakdown(wl, bodies), indent=1))
        return 0
    missing = None if args.anchor_only else ours_available()
    if args.anchor_only:
        res["ours_pending"] = "skipped (--anchor-only)"
    elif missing:
        log(f"ours unavailable: {missing}")
        res["ours_pending"] = missing
    else:
        log("=== our controller ===")
        res["ours"] = bench_ours(args, bodies)
        res["ours"]["inproc"] = inproc_breakdown(wl, bodies)
        res["ours"]["per_request"] = per_request_breakdown(res["ours"])
    if args.nginx:
        if shutil.which("nginx") is None:
            log("nginx not found: apt-get install -y nginx-light")
            return 2
        log("=== nginx (fixed reply) ===")
        res["nginx"] = bench_nginx(args, bodies)
    if not args.ours_only:
        if not ANCHOR_PY.exists():
            log(f"{ANCHOR_PY} missing: run benchmarks/run_all.py --setup-only")
            return 2
        log("=== LMCache's controller ===")
        res["lmcache"] = bench_lmcache(args, bodies)
    if "ours" in res and "lmcache" in res:
        res["verdict"] = verdict(res["ours"], res["lmcache"])
    res["loadavg_end"] = loadavg()
    publish(res, "http_bench", report(res), args.out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON result path (default benchmarks/results/http_bench.json)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=512, help="prompts held per instance")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=256, help="distinct /lookup bodies")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--repeats", type=int, default=3, help="wrk runs per connection count (best one reported)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of warm-up load before measuring")
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--admits", type=int, default=1_000_000, help="end-to-end admits per controller")
    ap.add_argument("--hashseed", type=int, default=0, help="PYTHONHASHSEED for LMCache's side")
    ap.add_argument("--quiet-wait", type=float, default=45,
                    help="seconds to wait for other work on the machine to settle first (0: don't)")
    ap.add_argument("--ours-args", default="", help="extra flags for our controller, e.g. '--http-threads 2'")
    ap.add_argument("--anchor-only", action="store_true", help="run only LMCache's side")
    ap.add_argument("--ours-only", action="store_true", help="run only our side (and nginx with --nginx)")
    ap.add_argument("--nginx", action="store_true", help="also run nginx answering a fixed reply (the transport alone)")
    ap.add_argument("--pin", action="store_true", help="servers on core 0, wrk on core 1")
    ap.add_argument("--breakdown-only", action="store_true",
                    help="only time Index.lookup_json's parts in process on the bodies (no servers)")
    args = ap.parse_args()
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
