"""Reading a ZMQ socket in bursts, with the index writes of what was read going on behind.

While messages keep coming, a source reads them without a trip through the event loop each,
and its index applies the last batch on its own thread meanwhile (``Index.apply_batch_later``).
Before the loop runs any other task, ``settle`` is called, so whatever else runs on the loop
sees every message read applied; at least every ``ROUNDS_BEHIND`` reads the loop gets a turn.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import zmq
import zmq.asyncio

ROUNDS_BEHIND = 16  # reads a source makes before the loop's other tasks get a turn
NOBLOCK = int(zmq.NOBLOCK)  # a plain int: flag arithmetic on the enum costs more than the read


class BurstReader:
    def __init__(self, sock: zmq.asyncio.Socket, settle: Callable[[], None]):
        self.sock = sock
        # non-blocking reads through a plain socket over the same one: the asyncio socket
        # would make a Future (and enum flag arithmetic) for each, which cost more than the read
        self.plain = zmq.Socket.shadow(sock.underlying)
        self.recv = self.plain.recv
        # pyzmq's Cython backend sets a received frame's ``more`` flag; its cffi backend (PyPy)
        # does not, so there messages are read whole
        self.by_frame = zmq.backend.Socket.__module__.startswith("zmq.backend.cython")
        self.settle = settle
        self.rounds = 0

    async def next(self) -> list[bytes]:
        """The next message: at once while they keep coming, else after settling and waiting."""
        frames = self.waiting()
        if frames is None or self.rounds >= ROUNDS_BEHIND:
            self.settle()
            self.rounds = 0
            if frames is None:
                frames = await self.sock.recv_multipart(copy=True)
            else:
                await asyncio.sleep(0)  # the loop's other tasks get their turn
        self.rounds += 1
        return frames

    def waiting(self) -> list[bytes] | None:
        """A message already received, or None."""
        # frame by frame: each frame comes back with its ``more`` flag, where ``recv_multipart``
        # makes a Python ``getsockopt(RCVMORE)`` call after each one (a third of its cost)
        try:
            if not self.by_frame:
                return self.plain.recv_multipart(NOBLOCK)
            frame = self.recv(NOBLOCK, copy=False)
        except zmq.Again:
            return None
        frames = [frame.bytes]
        while frame.more:
            # a message's frames arrive together: the rest is there once the first is
            frame = self.recv(NOBLOCK, copy=False)
            frames.append(frame.bytes)
        return frames
