"""Shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from soak import Controller  # noqa: E402


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
