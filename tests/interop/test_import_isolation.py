"""``import lmcache_rs`` (index, controller, worker) must not pull in vLLM, even where vLLM is
installed: the connector is an optional extra, loaded only when vLLM asks for it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lmcache_engines import INTEROP_PY, require_interop_venv

REPO = Path(__file__).resolve().parents[2]
require_interop_venv()

CHECK = """
import sys, importlib.util
assert importlib.util.find_spec("vllm") is not None, "vllm is not installed here: the check proves nothing"
import lmcache_rs, lmcache_rs.config, lmcache_rs.controller.__main__, lmcache_rs.worker.worker
assert "vllm" not in sys.modules, sorted(m for m in sys.modules if m.startswith("vllm"))[:5]
import lmcache_rs.vllm  # the package itself still only names the connector
assert "vllm" not in sys.modules, "importing lmcache_rs.vllm imported vllm"
lmcache_rs.vllm.LMCacheRsConnector  # the first use loads it
assert "vllm" in sys.modules
print("ok")
"""


def test_lmcache_rs_imports_without_loading_vllm():
    run = subprocess.run([str(INTEROP_PY), "-c", CHECK], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO / "python")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
