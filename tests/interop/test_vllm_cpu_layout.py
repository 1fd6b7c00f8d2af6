"""The connector's ``cpu`` layout (lmcache_rs.vllm.layout) read back from blocks written by
vLLM's own CPU cache writer, not by a copy of our assumption: exact for the kernels the
connector accepts (layout.CPU_ISAS), and known to differ for AMX, which it refuses."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


from lmcache_rs.vllm.layout import CPU_ISAS, KINDS
from lmcache_engines import INTEROP_PY, require_interop_venv

REPO = Path(__file__).resolve().parents[2]
require_interop_venv()


def test_cpu_layout_matches_vllms_own_cache_writer():
    assert "cpu" in KINDS
    run = subprocess.run([str(INTEROP_PY), str(REPO / "tools" / "vllm_cpu_layout_check.py")], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "python")})
    assert run.returncode == 0, run.stderr[-3000:]
    cases = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    ran = [c for c in cases if c["match"] is not None]
    accepted = [c for c in ran if c["isa"] in CPU_ISAS]
    assert {c["isa"] for c in accepted} == set(CPU_ISAS), cases  # both accepted kernels ran here
    assert all(c["match"] for c in accepted), [c for c in accepted if not c["match"]]
    # the layout is not AMX's: were it to match, the connector's refusal would be needless
    assert all(not c["match"] for c in ran if c["isa"] == "amx"), cases
