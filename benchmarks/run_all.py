"""``make bench``: set up the anchors' venv if needed, then run every benchmark.

    .venv/bin/python benchmarks/run_all.py [--setup-only] [--only index|http] [--quick]

The anchors (NVIDIA Dynamo's RadixTree, LMCache's controller) live only in a separate
virtualenv, ``.bench-venv`` at the repository root (git-ignored); they are never project
dependencies. Setup is idempotent: a stamp file records what was installed, and nothing is
installed again while it matches. LMCache is installed with ``--no-deps`` plus the modules its
controller imports (its full dependency list pulls GPU-only packages), and httptools and
uvloop so that its uvicorn server runs on its fastest stack.
wrk (the load generator of http_bench) comes from Debian: ``apt-get install -y wrk``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ANCHOR_PY, BENCH_DIR, OUR_PY, ROOT, log  # noqa: E402

BENCH_VENV = ROOT / ".bench-venv"
STAMP = BENCH_VENV / ".bench-deps"

# Versions the figures in BENCHMARKS.md were measured with.
DYNAMO = ["ai-dynamo-runtime==1.6.1"]
LMCACHE = ["lmcache==0.5.6"]  # installed with --no-deps
# What `python -m lmcache.v1.api_server` (its lmcache_controller) imports, and nothing more.
LMCACHE_CONTROLLER_IMPORTS = [
    "fastapi==0.165.0", "uvicorn==0.54.0", "pydantic==2.13.5", "msgspec==0.22.0", "pyzmq==27.3.0",
    "prometheus_client==0.24.1", "requests==2.34.2", "PyYAML==6.0.4", "torch==2.15.0",
    "transformers==5.24.0", "numpy==2.2.6", "cachetools==8.0.2", "numba==0.68.1",
    "opentelemetry-api==1.45.2", "py-cpuinfo==9.0.0", "psutil==7.2.2", "aiohttp==3.14.5",
    "setuptools>=77.0.3,<81",
    # not imported unconditionally, but LMCache depends on httptools and uvicorn uses it (and
    # uvloop, which ai-dynamo-runtime brings) when present: the anchor's fastest HTTP stack
    "httptools==0.9.0", "uvloop==0.23.0",
]


def spec_digest() -> str:
    return hashlib.sha256("\n".join(DYNAMO + LMCACHE + LMCACHE_CONTROLLER_IMPORTS).encode()).hexdigest()


def pip(*args: str) -> None:
    cmd = [str(ANCHOR_PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def setup_bench_venv() -> None:
    if STAMP.exists() and STAMP.read_text().strip() == spec_digest() and ANCHOR_PY.exists():
        log(".bench-venv is up to date")
        return
    if not ANCHOR_PY.exists():
        log("creating .bench-venv")
        base = shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(BENCH_VENV)], check=True)
    log("installing the anchors into .bench-venv (first time: several minutes, torch is large)")
    pip(*DYNAMO, *LMCACHE_CONTROLLER_IMPORTS)
    pip("--no-deps", *LMCACHE)
    check = subprocess.run(
        [str(ANCHOR_PY), "-c", "from dynamo.llm import RadixTree, compute_block_hash_for_seq; "
         "import lmcache.v1.api_server.__main__"],
        env=dict(os.environ, PYTHONHASHSEED="0"), capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"the anchors do not import in .bench-venv:\n{check.stderr[-3000:]}")
    STAMP.write_text(spec_digest() + "\n")
    log(".bench-venv ready")


def ensure_wrk() -> bool:
    if shutil.which("wrk"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing wrk from Debian")
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False)
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-q"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False)
    if shutil.which("wrk"):
        return True
    log("wrk is missing (apt-get install -y wrk); skipping http_bench")
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup-only", action="store_true")
    ap.add_argument("--only", choices=["index", "http"])
    ap.add_argument("--quick", action="store_true", help="smaller, shorter runs (a smoke test, not figures)")
    args = ap.parse_args()
    setup_bench_venv()
    if args.setup_only:
        return 0
    py = str(OUR_PY if OUR_PY.exists() else sys.executable)
    status = 0
    t0 = time.time()
    if args.only in (None, "index"):
        extra = (["--holdings", "200000", "--iters", "500", "--ingest-runs", "1", "--rounds", "1", "--passes", "1",
                  "--quiet-wait", "0"]
                 if args.quick else [])
        status |= subprocess.run([py, str(BENCH_DIR / "index_bench.py"), *extra], cwd=str(ROOT)).returncode
    if args.only in (None, "http") and ensure_wrk():
        extra = (["--duration", "2", "--warmup", "1", "--repeats", "1", "--admits", "200000", "--quiet-wait", "0"]
                 if args.quick else [])
        status |= subprocess.run([py, str(BENCH_DIR / "http_bench.py"), *extra], cwd=str(ROOT)).returncode
    log(f"benchmarks done in {time.time() - t0:.0f}s; results in benchmarks/results/, write-up in BENCHMARKS.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
