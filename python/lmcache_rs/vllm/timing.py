"""Opt-in timing of the connector's own calls inside vLLM.

A step of a small model lasts a few milliseconds and its medians move by more than the
connector costs, so the connector's share is measured from inside: with
``LMCACHE_RS_CONNECTOR_TIMING`` set to a file path, every connector process (the scheduler
side and each rank) appends one line per timed call, ``<phase> <microseconds>``, which
benchmarks/vllm_connector.py summarises. Unset (the default), ``add`` returns at once.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import IO, Optional

_PATH = os.environ.get("LMCACHE_RS_CONNECTOR_TIMING") or None
_lock = threading.Lock()
_file: Optional[IO[str]] = None
_pid = 0

now = time.perf_counter_ns


def enabled() -> bool:
    return _PATH is not None


def add(phase: str, elapsed_ns: int) -> None:
    """One call of ``phase`` took ``elapsed_ns`` (differences of ``now()``)."""
    if _PATH is None:
        return
    micros = elapsed_ns / 1000
    global _file, _pid
    with _lock:
        if _file is None or _pid != os.getpid():  # vLLM forks its processes: one handle each
            _file = open(_PATH, "a", buffering=1)
            _pid = os.getpid()
        _file.write(f"{phase} {micros:.1f}\n")


def summary(path: str) -> dict[str, dict[str, float]]:
    """Per phase of a timing file: calls, median and mean microseconds."""
    samples: dict[str, list[float]] = {}
    with open(path) as f:
        for line in f:
            phase, _, micros = line.partition(" ")
            try:
                samples.setdefault(phase, []).append(float(micros))
            except ValueError:
                continue  # a line cut short by a killed process
    return {phase: {"calls": len(values), "median_us": statistics.median(values),
                    "mean_us": statistics.fmean(values)} for phase, values in sorted(samples.items())}
