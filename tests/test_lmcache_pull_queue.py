"""The LMCache pull socket's queue is bounded: while the controller does not read (its event
loop busy), a flooding worker's sends stop being accepted after a bounded number of messages
instead of piling up in the controller's memory; once the loop reads again, every message
accepted is received (PUSH/PULL never drops). A real controller in process, real ZMQ sockets
on loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import zmq

from lmcache_rs.controller.lmcache_source import PULL_QUEUE_MESSAGES
from lmcache_rs.controller.server import Controller
from lmcache_rs.controller.settings import Settings

FRAME = b"\xc1" * (1 << 20)  # 1 MiB that is not msgpack (0xc1 is never used): counted, dropped
TRIES = 16 * PULL_QUEUE_MESSAGES  # what an unbounded queue would take in, and more


def _tcp_buffer_max() -> int:
    """The most the kernel lets one connection's send and receive buffers hold together."""
    try:
        return sum(int(Path(f"/proc/sys/net/ipv4/tcp_{d}mem").read_text().split()[2]) for d in ("r", "w"))
    except OSError:
        return 16 << 20


# The queue itself, the messages the sender's ZMQ holds (its queue of one, the one being
# written), what the loopback TCP buffers can hold, and a few in ZMQ's decoders.
BOUND = PULL_QUEUE_MESSAGES + 4 + -(-_tcp_buffer_max() // len(FRAME)) + 4


def _flood(push: zmq.Socket) -> int:
    """Send without blocking until sends have been refused for a second (or TRIES were
    accepted); how many were accepted. Runs on the loop's thread, so the controller reads
    nothing meanwhile: only ZMQ's I/O threads move data."""
    accepted, refused_since = 0, None
    while accepted < TRIES:
        try:
            push.send(FRAME, zmq.NOBLOCK)
            accepted += 1
            refused_since = None
        except zmq.Again:
            now = time.monotonic()
            refused_since = refused_since or now
            if now - refused_since > 1.0:
                break
            time.sleep(0.005)
    return accepted


def test_a_flood_is_held_back_not_queued_and_nothing_is_lost():
    async def main():
        controller = Controller(Settings(port=0, monitor_port=0, monitor_ports={"pull": 0, "reply": 0}))
        await controller.start()
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 1)
        try:
            source = controller.lmcache
            push.connect(f"tcp://127.0.0.1:{source.bound['pull']}")
            accepted = _flood(push)
            assert 0 < accepted <= BOUND, f"{accepted} messages taken in while nobody read"
            deadline = time.monotonic() + 120
            while source.socket_messages.get("pull", 0) < accepted and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            assert source.socket_messages.get("pull", 0) == accepted  # every one, none twice
        finally:
            push.close(0)  # after the wait: what it accepted was delivered
            ctx.term()
            await controller.stop()

    asyncio.run(main())
