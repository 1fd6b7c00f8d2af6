"""benchmarks/worker_gpu.py runs (tiny shape, CPU) and checks its own results bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_worker_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "worker_gpu.py"), "--smoke", "--device", "cpu",
         "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "raw D2H" in run.stdout and "bit exact: yes" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["tokens"] for r in rows] == [256, 1024]
    assert all(r["bit_exact"] and r["store_gbps"] > 0 and r["retrieve_gbps"] > 0 for r in rows)
