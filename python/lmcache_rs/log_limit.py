"""A cap on how fast one log line can repeat.

Refusals of bad input (a malformed request, a server-busy 503, a frame from a stranger) are
logged at warning, and a hostile or broken client can cause them as fast as it can connect.
Each call site keeps one :class:`RateLimitedLog`: at most ``burst`` lines per ``period``
seconds; the rest are counted and the count is logged with the next line let through. The
events themselves are still counted exactly in the controller's metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, burst: int = 20, period: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if burst < 1 or period <= 0:
            raise ValueError(f"burst must be >= 1 and period > 0, got burst={burst} period={period}")
        self.logger = logger
        self.level = level
        self.burst = burst
        self.period = period
        self.clock = clock
        self._window_start = float("-inf")
        self._in_window = 0
        self.suppressed = 0  # lines dropped since the last one logged

    def __call__(self, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        now = self.clock()
        if now - self._window_start >= self.period:
            self._window_start = now
            self._in_window = 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return
        self._in_window += 1
        if self.suppressed:
            msg = f"{msg} (and {self.suppressed} similar lines not logged)"
            self.suppressed = 0
        self.logger.log(self.level, msg, *args)


class RepeatLimitedLog:
    """One line per key per ``period`` seconds: a peer that retries the same refused request
    every second is logged once a period (with how many repeats were not), not at every retry.
    At most ``max_keys`` keys are remembered (the oldest forgotten first)."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, period: float = 60.0,
                 max_keys: int = 4096, clock: Callable[[], float] = time.monotonic):
        if period <= 0 or max_keys < 1:
            raise ValueError(f"period must be > 0 and max_keys >= 1, got period={period} max_keys={max_keys}")
        self.logger = logger
        self.level = level
        self.period = period
        self.max_keys = max_keys
        self.clock = clock
        self._seen: dict[object, list] = {}  # key -> [time last logged, repeats not logged since]

    def __call__(self, key: object, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(self.level):
            return
        now = self.clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.period:
            entry[1] += 1
            return
        if entry is not None and entry[1]:
            msg = f"{msg} (repeated {entry[1]} times in the last {self.period:g} s, not logged)"
        self._seen.pop(key, None)
        self._seen[key] = [now, 0]
        while len(self._seen) > self.max_keys:
            del self._seen[next(iter(self._seen))]
        self.logger.log(self.level, msg, *args)
