"""Back-pressure for one connection, in both directions.

Reading: the owner counts queued work (pipelined requests, running commands) and calls
``pause_reading`` when it reaches its high-water mark, ``resume_reading`` once it drains
below it. Writing: asyncio calls ``pause_writing``/``resume_writing`` on the protocol, which
forwards them here; ``drain()`` waits until the transport's buffer is low again.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    """Read/write back-pressure of one transport.

    ``high_water`` is the number of queued items (owner-defined) at which reading pauses;
    reading resumes when the queue is back at ``low_water`` (default ``high_water // 2``).
    """

    __slots__ = ("_transport", "high_water", "low_water", "read_paused", "write_paused", "_drain_waiter")

    def __init__(self, transport: asyncio.BaseTransport, high_water: int, low_water: int | None = None):
        if high_water < 1:
            raise ValueError(f"high_water must be at least 1, got {high_water}")
        self._transport = transport
        self.high_water = high_water
        self.low_water = high_water // 2 if low_water is None else low_water
        self.read_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- reading --------------------------------------------------------------------------
    def update(self, queued: int) -> None:
        """Pause or resume reading for a queue of ``queued`` items."""
        if queued >= self.high_water:
            self.pause_reading()
        elif queued <= self.low_water:
            self.resume_reading()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            try:
                self._transport.pause_reading()  # type: ignore[attr-defined]
            except (RuntimeError, AttributeError):  # closing transport
                pass

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            try:
                self._transport.resume_reading()  # type: ignore[attr-defined]
            except (RuntimeError, AttributeError):
                pass

    # -- writing --------------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    async def drain(self) -> None:
        """Wait until the transport accepts more data (returns at once if it does)."""
        if not self.write_paused:
            return
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drain_waiter)

    def connection_lost(self) -> None:
        """Release drain waiters; writes after this are dropped by the transport."""
        self.write_paused = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._drain_waiter
        self._drain_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
