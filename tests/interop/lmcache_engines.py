"""Real LMCache engines for the interop tests: one process each, driven by tools/lmcache_engine.py
in the interop venv (LMCache 0.5.6 and vLLM on CPU)."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INTEROP_PY = REPO / ".venv-interop" / "bin" / "python"
ENGINE = REPO / "tools" / "lmcache_engine.py"
SEED = "123"  # PYTHONHASHSEED of every engine and controller: the spec's


def require_interop_venv() -> None:
    """At a test module's import: CI fails without the interop venv, elsewhere the module skips."""
    if not INTEROP_PY.exists():
        if os.environ.get("CI"):
            raise RuntimeError(f"{INTEROP_PY} is missing: `make interop-venv` builds it")
        pytest.skip("no interop venv (make interop-venv)", allow_module_level=True)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Engine:
    """One real LMCache engine process (one worker of one instance)."""

    def __init__(self, instance_id: str, pull: int, reply: int, worker_port: int, *, chunk_size: int,
                 vllm: bool = True, heartbeat: float | None = 1.0, max_cpu_gb: float = 0.05,
                 save_unfull_chunk: bool = True, loopback: bool = False):
        self.instance_id = instance_id
        config = {
            "chunk_size": chunk_size, "local_cpu": True, "max_local_cpu_size": max_cpu_gb,
            "enable_controller": True, "lmcache_instance_id": instance_id,
            "controller_pull_url": f"127.0.0.1:{pull}", "controller_reply_url": f"127.0.0.1:{reply}",
            "lmcache_worker_ports": [worker_port], "save_unfull_chunk": save_unfull_chunk,
        }
        if heartbeat is not None:
            config["lmcache_worker_heartbeat_time"] = heartbeat
            config["lmcache_worker_heartbeat_delay_time"] = 0.5
        argv = [str(INTEROP_PY), str(ENGINE), json.dumps(config)]
        argv += ([] if vllm else ["--no-vllm"]) + (["--loopback"] if loopback else [])
        env = dict(os.environ, PYTHONHASHSEED=SEED)
        env.pop("PYTHONPATH", None)
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"lmcache-{instance_id}-{os.getpid()}.log", "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        ready = json.loads(self._line(180))
        assert ready["ready"]
        self.none_hash = ready["none_hash"]

    def _line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"LMCache engine {self.instance_id} did not answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"LMCache engine {self.instance_id} exited ({self.proc.poll()})")
        return line

    def ask(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line(120))

    def store(self, tokens: list[int]) -> None:
        assert self.ask("store", tokens=tokens)["ok"]

    def hit(self, tokens: list[int]) -> int:
        return self.ask("lookup", tokens=tokens)["hit"]

    def keys(self, tokens: list[int]) -> list[int]:
        return self.ask("keys", tokens=tokens)["keys"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("stop")
                self.proc.wait(timeout=30)
            except Exception:
                self.kill()
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.log.close()
