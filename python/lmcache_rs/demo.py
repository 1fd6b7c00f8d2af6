"""The spec's "Lookup the KV cache" flow, with our controller and worker (``make demo``).

1. start ``lmcache_controller --host localhost --port 9000 --monitor-port 9001``;
2. start one ``lmcache_worker`` configured by the spec's example.yaml, preloaded with the KV
   cache of the spec's 12 tokens;
3. wait until the controller knows the worker's chunks;
4. send the spec's ``POST /lookup`` with curl (urllib when curl is missing) and print the answer;
5. stop both processes (SIGTERM) and check that they exit cleanly.

Every command is printed so it can be repeated by hand. Exits 0 when the answer holds
``"lmcache_default_instance": ["LocalCPUBackend", 12]``, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

TOKENS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
INSTANCE = "lmcache_default_instance"
HOST, HTTP_PORT, MONITOR_PORT = "localhost", 9000, 9001
EXAMPLE_YAML = """\
chunk_size: 256
local_cpu: True
max_local_cpu_size: 5

# cache controller configurations
enable_controller: True
lmcache_instance_id: "lmcache_default_instance"
controller_pull_url: "localhost:9001"
lmcache_worker_ports: 8001

# Peer identifiers
p2p_host: "localhost"
p2p_init_ports: 8200
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def program(name: str, module: str) -> list[str]:
    """The console script when installed next to this Python, else ``python -m module``."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


def show(argv: list[str], env: Optional[dict[str, str]] = None) -> str:
    parts = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    shown = [Path(argv[0]).name if Path(argv[0]).name.startswith("lmcache_") else argv[0]] + argv[1:]
    return " ".join(parts + [shlex.quote(a) for a in shown])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def example_config(workdir: Path) -> Path:
    for candidate in (Path(__file__).resolve().parents[2] / "configs" / "example.yaml", Path("configs/example.yaml")):
        if candidate.is_file():
            try:
                return candidate.resolve().relative_to(Path.cwd())  # shorter to print and retype
            except ValueError:
                return candidate
    path = workdir / "example.yaml"
    path.write_text(EXAMPLE_YAML)
    return path


def post_lookup(body: str) -> tuple[list[str], str]:
    """The command shown and the answer of POST /lookup."""
    url = f"http://{HOST}:{HTTP_PORT}/lookup"
    curl = shutil.which("curl")
    argv = ["curl", "-s", "-X", "POST", url, "-H", "Content-Type: application/json", "-d", body]
    if curl:
        out = subprocess.run([curl] + argv[1:], capture_output=True, text=True, timeout=10)
        return argv, out.stdout
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return argv + ["  # (sent with urllib: curl is not installed)"], response.read().decode()


def quiet_lookup(body: str) -> Optional[dict]:
    request = urllib.request.Request(
        f"http://{HOST}:{HTTP_PORT}/lookup", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None


def stop(name: str, proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        say(f"$ kill -TERM {proc.pid}   # {name}")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def main() -> int:
    busy = [p for p in (HTTP_PORT, MONITOR_PORT, 8001, 8200, 8300, 8400) if not port_free(p)]
    if busy:
        say(f"demo: port(s) {busy} are in use; stop whatever holds them (the spec's flow needs 9000, 9001, 8001, 8200, and LMCache's 8300, 8400)")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="lmcache-demo-"))
    config = example_config(workdir)
    preload = workdir / "prompts.jsonl"
    preload.write_text(json.dumps(TOKENS) + "\n")
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    ok = False
    try:
        say("# 1. the controller: HTTP API on 9000, workers report on 9001")
        ctl_env = {"PYTHONHASHSEED": "123"}
        ctl = program("lmcache_controller", "lmcache_rs.controller") + [
            "--host", HOST, "--port", str(HTTP_PORT), "--monitor-port", str(MONITOR_PORT)]
        say(f"$ {show(ctl, ctl_env)} &")
        logs["controller"] = open(workdir / "controller.log", "wb")
        procs["controller"] = subprocess.Popen(ctl, env={**os.environ, **ctl_env}, stdout=logs["controller"],
                                               stderr=subprocess.STDOUT)
        say()
        say(f"# 2. one worker configured by the spec's example.yaml, holding the KV cache of {len(TOKENS)} tokens")
        say(f"$ cat {preload}")
        say(preload.read_text().rstrip())
        wrk_env = {"PYTHONHASHSEED": "123"}
        wrk = program("lmcache_worker", "lmcache_rs.worker") + ["--config", str(config), "--preload", str(preload)]
        say(f"$ {show(wrk, wrk_env)} &")
        logs["worker"] = open(workdir / "worker.log", "wb")
        procs["worker"] = subprocess.Popen(wrk, env={**os.environ, **wrk_env}, stdout=logs["worker"],
                                           stderr=subprocess.STDOUT)
        say()
        body = json.dumps({"tokens": TOKENS})
        deadline = time.monotonic() + 60
        while True:
            answer = quiet_lookup(body)
            if answer and INSTANCE in answer:
                break
            dead = [name for name, p in procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else "not ready after 60 s"
                say(f"demo: {why}; logs in {workdir}")
                for name in procs:
                    say(f"--- {name}.log ---\n" + (workdir / f"{name}.log").read_text()[-3000:])
                return 1
            time.sleep(0.1)
        say("# 3. the spec's lookup")
        argv, text = post_lookup(body)
        say("$ " + " ".join(shlex.quote(a) if not a.startswith("  #") else a for a in argv))
        say(text)
        answer = json.loads(text)
        ok = answer.get(INSTANCE) == ["LocalCPUBackend", len(TOKENS)]
        say()
        say(f"# {INSTANCE} holds the longest prefix in LocalCPUBackend: {answer.get(INSTANCE)}" if ok
            else f"# unexpected answer: {text}")
        say()
        say("# 4. stop both")
    finally:
        codes = {name: stop(name, procs[name]) for name in ("worker", "controller") if name in procs}
        for handle in logs.values():
            handle.close()
    say(f"# exit codes: {codes}")
    if any(code != 0 for code in codes.values()):
        say(f"demo: a process did not exit cleanly; logs in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
