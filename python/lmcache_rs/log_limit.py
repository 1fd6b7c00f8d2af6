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
