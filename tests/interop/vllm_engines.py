"""Real vLLM engines (CPU) for the interop tests: one process each, driven line by line by
tools/vllm_engine.py in the interop venv."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path


from lmcache_engines import INTEROP_PY, REPO, require_interop_venv  # noqa: F401 (re-exported)

ENGINE = REPO / "tools" / "vllm_engine.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmEngine:
    """tools/vllm_engine.py with ``config`` (its CONFIG_JSON), logging to ``workdir/<name>.log``.
    ``wait_ready`` blocks until the engine is up (start-up takes ~40 s)."""

    def __init__(self, workdir: Path, config: dict, name: str = "vllm", env: dict | None = None):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(INTEROP_PY), str(ENGINE), json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, cwd=workdir,
                                     env=env if env is not None else dict(os.environ))

    def wait_ready(self) -> None:
        ready = self._read()
        assert ready == {"ready": True}, ready

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM engine {self.name} exited ({self.proc.poll()}); see {self.log_path}:\n"
                               + self.log_path.read_text(errors="replace")[-3000:])
        return json.loads(line)

    def call(self, **cmd) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.call(op="stop")
            self.proc.wait(timeout=60)
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self.log.close()
