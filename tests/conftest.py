"""Shared fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from soak import Controller  # noqa: E402

# Controllers started by tests serve no LMCache worker unless a test asks for it with
# --monitor-ports: LMCache's default ports (8300, 8400) are not the tests' to take.
os.environ.setdefault("LMCACHE_CONTROLLER_MONITOR_PORTS", "none")


@pytest.fixture
def controller(tmp_path):
    """Start real controller processes (soak.Controller) with these flags; all killed after."""
    procs = []

    def start(*args: str, env: dict | None = None) -> Controller:
        c = Controller(tmp_path, *args, env=env)
        procs.append(c)
        c.start()
        return c

    yield start
    for c in procs:
        c.kill()
