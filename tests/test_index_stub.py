"""The type stub _core.pyi matches the built module (mypy stubtest), so it cannot drift."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_stub_matches_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "lmcache_rs._core"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
