#!/usr/bin/env bash
# The index's tests under every CPython 3.10-3.14 found on this machine (on PATH or under
# ~/.pyenv/versions). The list-of-int fast path reads CPython's int layout, which changed in
# 3.12; this runs it on each layout. Every interpreter gets its own venv, without torch (the index
# does not need it), under target/interpreters/. `make test-interpreters` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
found=0
for minor in 10 11 12 13 14; do
    py=""
    for candidate in $(ls -d "$HOME"/.pyenv/versions/3."$minor".*/bin/python3."$minor" 2>/dev/null | sort -V | tail -1) \
                     $(command -v python3."$minor" || true); do
        if "$candidate" -c 'import sys; assert sys.implementation.name == "cpython"' 2>/dev/null; then
            py=$candidate
            break
        fi
    done
    [ -n "$py" ] || continue
    found=$((found + 1))
    env=target/interpreters/3.$minor
    echo "== CPython $("$py" -c 'import platform; print(platform.python_version())') ($py)"
    [ -x "$env/bin/python" ] || "$py" -m venv "$env"
    "$env/bin/pip" install -q "maturin>=1.7,<2" pytest pytest-timeout hypothesis numpy xxhash
    rm -rf "$env/wheels"
    PYO3_PYTHON="$env/bin/python" CARGO_TARGET_DIR=target/interpreters/build \
        "$env/bin/maturin" build --release -q -i "$env/bin/python" -o "$env/wheels"
    "$env/bin/pip" install -q --force-reinstall --no-deps "$env"/wheels/*.whl
    "$env/bin/python" -m pytest -q -p no:cacheprovider tests/test_index.py tests/test_index_inputs.py \
        tests/test_index_concurrency.py tests/test_index_snapshot.py tests/test_index_stateful.py \
        tests/test_hashing.py tests/test_lmcache_hash.py
done
if [ "$found" -eq 0 ]; then
    echo "no CPython 3.10-3.14 found" >&2
    exit 1
fi
