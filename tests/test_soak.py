"""The soak, short: benchmarks/soak.py for 30 s (``make soak`` runs it for 10 minutes).

Three real workers admit and evict all the time while eight clients look up; the run must end
with zero errors of any kind and the controller's RSS within +-10 % of its value after warm-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_soak_30_seconds(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "30",
                           "--json", str(out)], capture_output=True, text=True, timeout=150)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["problems"] == [] and summary["errors"] == 0
    samples = summary["samples"]
    assert len(samples) >= 8
    assert all(s["p50_ms"] > 0 and s["p99_ms"] >= s["p50_ms"] for s in samples)
    assert sum(s["admit_per_s"] for s in samples) > 0 and sum(s["evict_per_s"] for s in samples) > 0
    assert summary["rss"]["max_dev_pct"] <= 10
    assert summary["lookups"] >= 0.8 * 30 * 400
