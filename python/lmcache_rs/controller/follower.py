"""Following the JetStream log: every message applied once, in stream order, from a position.

A :class:`Follower` reads ``LMC_OPS`` through an ordered ephemeral consumer that starts at
``applied + 1`` (no consumer state on the server: a restarted follower, or a restarted server,
simply subscribes again from its own position). Each message is checked to be exactly the next
stream sequence: an older one (a redelivery) is skipped, a newer one (a gap) makes it subscribe
again from ``applied + 1``; a gap that persists means the messages were purged.

Replicas follow for ever; an ingest follows once at start, to rebuild what it had published.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Callable

from .jetstream import STREAM, SUBJECTS, connect, decode, ensure_stream, stream_identity

log = logging.getLogger("lmcache_rs.controller")


class LogGone(RuntimeError):
    """The messages after our position were purged from the stream."""


class Follower:
    def __init__(self, url: str, name: str, apply: Callable[[dict], None]):
        self.url = url
        self.name = name
        self.apply = apply  # called with each decoded message, in order
        self.applied = 0  # stream sequence of the last message applied
        self.start_target = 0  # the stream's last sequence when we started: ready once applied
        self.skipped = 0  # redelivered messages at or below applied
        self.gaps = 0  # resubscriptions after a message past applied + 1
        self.broken: str | None = None  # why following stopped, if it did
        # stopped because our next messages are gone (purged, or a stream created again): a
        # snapshot can bring us back; a message we could not apply cannot
        self.recoverable = False
        self.stream = ""  # identity of the stream we follow (jetstream.stream_identity)
        # publish -> applied, in s, of the messages published after we started
        self.lags: collections.deque[float] = collections.deque(maxlen=100_000)
        self.nc: Any = None
        self.js: Any = None
        self._sub: Any = None
        self._advanced = asyncio.Event()
        self._resubscribing: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        # a resubscription pending means we are not following: what we serve may be stale
        return (self.broken is None and self._sub is not None and self.applied >= self.start_target
                and (self._resubscribing is None or self._resubscribing.done()))

    async def connect(self) -> None:
        if self.nc is None:
            self.nc = await connect(self.url, self.name)
            self.js = self.nc.jetstream()
            await ensure_stream(self.js)

    async def start(self, applied: int = 0) -> None:
        """Connect and subscribe from ``applied + 1``; raises LogGone when those messages
        were purged."""
        self.applied = applied
        await self.connect()
        info = await self.js.stream_info(STREAM)
        self.start_target = max(applied, info.state.last_seq)
        self.stream = stream_identity(info)
        self._check_position(info)
        await self._subscribe()

    def _check_position(self, info: Any) -> None:
        if self.stream and stream_identity(info) not in ("", self.stream):
            raise LogGone("the stream was deleted and created again; our position is in the old one")
        need = self.applied + 1
        if need < info.state.first_seq and need <= info.state.last_seq:
            raise LogGone(f"the stream starts at {info.state.first_seq}; messages from {need} are gone")

    async def _subscribe(self) -> None:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.applied + 1)
        self._sub = await self.js.subscribe(SUBJECTS, stream=STREAM, cb=self._on_message, ordered_consumer=True,
                                            config=config)

    async def _on_message(self, msg: Any) -> None:
        if self.broken is not None:
            return
        seq = msg.metadata.sequence.stream
        if seq <= self.applied:
            self.skipped += 1
            return
        if seq != self.applied + 1:
            self.gaps += 1
            if self._resubscribing is None or self._resubscribing.done():
                self._resubscribing = asyncio.get_running_loop().create_task(self._resubscribe(seq))
            return
        try:
            body = decode(msg.data)
            self.apply(body)
        except Exception as exc:  # a message we cannot apply: stop rather than drift
            self.broken = f"message {seq} could not be applied: {exc}"
            log.error("log follower: %s; following stopped", self.broken)
            self._advanced.set()
            return
        self.applied = seq
        ts = body.get("ts")
        if isinstance(ts, float) and seq > self.start_target:  # following live, not catching up
            self.lags.append(time.time() - ts)
        self._advanced.set()

    async def _resubscribe(self, seen: int) -> None:
        log.warning("log follower: got message %d after %d; subscribing again from %d", seen, self.applied,
                    self.applied + 1)
        sub, self._sub = self._sub, None
        try:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception as exc:  # already closed (connection lost): it delivers nothing more
                    log.debug("log follower: unsubscribe: %s", exc)
            self._check_position(await self.js.stream_info(STREAM))
            await self._subscribe()
        except LogGone as exc:
            self.broken = str(exc)
            self.recoverable = True
            log.error("log follower: %s; following stopped", exc)
            self._advanced.set()
        except Exception as exc:
            log.warning("log follower: subscribing again failed (%s); retrying", exc)
            await asyncio.sleep(0.5)
            self._resubscribing = asyncio.get_running_loop().create_task(self._resubscribe(seen))

    async def reset(self) -> None:
        """Stop following and forget why it stopped, before ``start`` from another position."""
        if self._resubscribing is not None:
            self._resubscribing.cancel()
            self._resubscribing = None
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # already closed: it delivers nothing more
                log.debug("log follower: unsubscribe: %s", exc)
        self.broken = None
        self.recoverable = False
        self.lags.clear()

    async def wait_applied(self, seq: int, timeout: float) -> bool:
        """Wait until the message ``seq`` is applied (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while self.applied < seq and self.broken is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._advanced.clear()
            try:
                await asyncio.wait_for(self._advanced.wait(), left)
            except asyncio.TimeoutError:
                return self.applied >= seq
        return self.applied >= seq

    async def last_seq(self) -> int:
        return (await self.js.stream_info(STREAM)).state.last_seq

    async def stop(self) -> None:
        if self._resubscribing is not None:
            self._resubscribing.cancel()
        if self.nc is not None:
            try:
                await self.nc.close()
            except Exception:  # closing a connection that is already gone
                pass
            self.nc = None
