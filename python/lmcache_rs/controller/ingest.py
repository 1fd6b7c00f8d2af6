"""The ingest's writer: index operations recorded by the sources, batched, published in order.

Operations arrive through ``record`` (the sink of every RecordingIndex, oplog.py), already
applied to the ingest's own indexes. They are grouped per source subject (``lmc.ops.rs``,
``lmc.ops.lmcache``, ``lmc.ops.vllm``) and cut into a message at about 64 KB or after 5 ms,
whichever comes first. One task publishes the messages one after another, so the log holds
them in the order the ingest applied them; a publish that fails (no ack, server restarting)
is retried with the same message id until it is stored, and the stream drops a copy it
already has.

At start the ingest takes a new incarnation (above the last message's, and the clock in ms),
claims the log (an empty message on ``lmc.ops.ingest``, published unconditionally) and rebuilds
its indexes by following the log up to its claim (follower.py), so it knows what it had
published before a restart, and what an ingest it replaces had published.

One writer: every later message carries ``Nats-Expected-Last-Sequence``, the sequence of the
message this ingest stored before it (its claim, first). JetStream refuses it when anything else
was appended meanwhile: another ingest claimed the log (the newest ingest wins). The ingest is
then fenced: it publishes nothing more and reports why (``on_fenced``). A retried publish
whose first copy was stored is answered as a duplicate (the stream checks the message id
before the expected sequence); one retried after the duplicate window is refused, and is
recognised as ours by the id of the message stored right after the expected sequence.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from typing import Any, Callable

from .jetstream import (SUBJECT_PREFIX, STREAM, connect, decode, encode, ensure_stream, message_id,
                        stream_identity)
from .oplog import KV_PREFIX, Op

log = logging.getLogger("lmcache_rs.controller")

MAX_MESSAGE_BYTES = 64 * 1024  # a message is cut at about this much
MAX_OP_KEYS = 32 * 1024  # keys of one operation in one message (256 KB)
FLUSH_DELAY = 0.005  # or when its oldest operation waited this long
SOURCES = ("rs", "lmcache", "vllm")
CLAIM = "ingest"  # subject tail of the message with which an ingest takes the log over
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code: Nats-Expected-Last-Sequence does not match


class Fenced(RuntimeError):
    """Another writer appended to the stream: this ingest must not write any more."""


def source_of(space: str) -> str:
    return "vllm" if space.startswith(KV_PREFIX) else space


class Publisher:
    """Batches recorded operations per source and publishes them to the stream in order."""

    def __init__(self, url: str, resend_fraction: float = 0.0, on_fenced: Callable[[str], None] | None = None):
        self.url = url
        self.on_fenced = on_fenced  # called once, with the reason, when another writer took the log
        self.resend_fraction = resend_fraction
        self._rng = random.Random(0)  # resends are reproducible
        self.inc = 0  # this incarnation; set by start()
        self.numbers: dict[str, int] = {}  # messages cut per source in this incarnation
        self._buffers: dict[str, list[list]] = {}
        self._sizes: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._outbox: collections.deque[tuple[str, int, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._cut_count = 0  # messages cut so far
        self._stored_count = 0  # of those, stored (they are published in order)
        self._progress = asyncio.Event()  # set whenever one more is stored
        self._task: asyncio.Task | None = None
        self.nc: Any = None
        self.js: Any = None
        self.last_seq = 0  # stream sequence of the last message stored
        self.published = 0  # messages stored
        self.duplicates = 0  # publishes the stream reported as already stored
        self.retries = 0  # publishes retried after an error
        self.resent = 0  # messages published twice on purpose (resend_fraction)
        self.claim_seq = 0  # stream sequence of our claim: everything after it is ours
        self.stream = ""  # identity of the stream we claimed (jetstream.stream_identity)
        self.fenced: str | None = None  # why we stopped publishing, once another writer appended

    async def start(self) -> None:
        """Connect, make sure the stream exists, take the next incarnation number and claim
        the log: from ``claim_seq`` on, every message is ours or refused."""
        self.nc = await connect(self.url, "lmcache-ingest")
        self.js = self.nc.jetstream()
        info = await ensure_stream(self.js)
        self.stream = stream_identity(info)
        # after a purge the log may no longer name the last incarnation: the clock keeps
        # message ids of a new incarnation apart from those in the duplicate window
        self.inc = max(await self._last_incarnation() + 1, int(time.time() * 1000))
        # unconditional: whatever another ingest appended before it is in the log we rebuild
        # from, and its next publish (expecting its own last message) is refused
        claim = encode(CLAIM, self.inc, 0, time.time(), [])
        await self._publish(CLAIM, claim, message_id(CLAIM, self.inc, 0), None)
        self.claim_seq = self.last_seq
        self._task = asyncio.get_running_loop().create_task(self._publish_loop())
        self._task.add_done_callback(self._publish_loop_ended)
        log.info("ingest: publishing to %s stream %s as incarnation %d (claimed the log at %d)", self.url, STREAM,
                 self.inc, self.claim_seq)

    async def _last_incarnation(self) -> int:
        from nats.js.errors import NotFoundError

        last = 0
        for src in (*SOURCES, CLAIM):
            try:
                msg = await self.js.get_last_msg(STREAM, SUBJECT_PREFIX + src)
            except NotFoundError:
                continue
            try:
                last = max(last, int(decode(msg.data)["inc"]))
            except (ValueError, KeyError, TypeError):
                log.warning("ingest: the last message on %s%s is not ours; ignored", SUBJECT_PREFIX, src)
        return last

    # -- recording ---------------------------------------------------------------------------
    def record(self, space: str, op: Op) -> None:
        if self.fenced is not None:  # nothing we record reaches the log any more
            return
        keys = op[4]
        if keys is not None and len(keys) > (MAX_OP_KEYS * 8 if isinstance(keys, bytes) else MAX_OP_KEYS):
            # a message must fit the server's max_payload (1 MiB by default): a large admit
            # (a full sync) goes in parts; meanwhile replicas may miss some of its chunks,
            # never report one the worker does not hold
            step = MAX_OP_KEYS * 8 if isinstance(keys, bytes) else MAX_OP_KEYS
            for i in range(0, len(keys), step):
                self._record(space, [*op[:4], keys[i:i + step]])
            return
        self._record(space, op)

    def _record(self, space: str, op: Op) -> None:
        src = source_of(space)
        buf = self._buffers.get(src)
        if buf is None:
            buf = self._buffers[src] = []
            self._sizes[src] = 0
        buf.append([space, *op])
        keys = op[4]
        # the strings count too: instance ids may be 1 KiB, and a message must fit max_payload
        self._sizes[src] += (48 + len(space) + len(op[1] or "") + len(op[3] or "")
                             + (len(keys) if isinstance(keys, bytes) else 9 * len(keys) if keys else 0))
        if self._sizes[src] >= MAX_MESSAGE_BYTES:
            self._cut(src)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.cut_all)

    def _cut(self, src: str) -> None:
        ops = self._buffers.pop(src, None)
        self._sizes.pop(src, None)
        if not ops:
            return
        n = self.numbers.get(src, 0) + 1
        self.numbers[src] = n
        self._outbox.append((src, n, encode(src, self.inc, n, time.time(), ops)))
        self._cut_count += 1
        self._wake.set()

    def cut_all(self) -> None:
        """Turn everything recorded so far into messages (in the order of their sources' first
        operation; operations of different sources commute)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for src in list(self._buffers):
            self._cut(src)

    async def flushed(self, timeout: float) -> int | None:
        """Publish everything recorded so far; a stream sequence at or after its last message
        (what comes later may be stored meanwhile), or None when it was not stored within
        ``timeout``."""
        self.cut_all()
        if self.fenced is not None:  # what was recorded since will never be in the log
            return None
        target = self._cut_count
        deadline = time.monotonic() + timeout
        while self._stored_count < target:
            if self.fenced is not None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except asyncio.TimeoutError:
                return None
        return self.last_seq

    # -- publishing ----------------------------------------------------------------------------
    async def _publish_loop(self) -> None:
        try:
            await self._publish_all()
        except Fenced as exc:
            self.fenced = str(exc)
            self._outbox.clear()
            self._buffers.clear()
            self._progress.set()  # flushed() answers None at once
            log.critical("ingest: fenced: %s. This ingest publishes nothing more.", exc)
            if self.on_fenced is not None:
                self.on_fenced(self.fenced)

    async def _publish_all(self) -> None:
        while True:
            if not self._outbox:
                self._wake.clear()
                await self._wake.wait()
                continue
            src, n, payload = self._outbox[0]
            for msg_id, part in self._fitting(message_id(src, self.inc, n), payload):
                expected = self.last_seq  # the message we stored last: nothing else may follow it
                await self._publish(src, part, msg_id, expected)
                if self.resend_fraction and self._rng.random() < self.resend_fraction:
                    self.resent += 1
                    await self._publish(src, part, msg_id, expected)  # fault injection: a retried publish
            self._outbox.popleft()
            self._stored_count += 1
            self._progress.set()

    def _fitting(self, msg_id: str, payload: bytes) -> list[tuple[str, bytes]]:
        """The message, or its operations in halves (ids ``<id>.0``, ``<id>.1``, ...) when it is
        larger than the server takes: the size estimate of ``_record`` is not exact, and a
        publish that can never succeed would stall the log."""
        limit = self.nc.max_payload - 1024  # headers and subject
        if len(payload) <= limit:
            return [(msg_id, payload)]
        body = decode(payload)
        ops = body["ops"]
        if len(ops) < 2:
            raise RuntimeError(f"ingest: one operation of {len(payload)} bytes is larger than the server's "
                               f"max_payload ({self.nc.max_payload})")
        half = len(ops) // 2
        out = []
        for k, part in enumerate((ops[:half], ops[half:])):
            out += self._fitting(f"{msg_id}.{k}", encode(body["src"], body["inc"], body["n"], body["ts"], part))
        return out

    def _publish_loop_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("ingest: publishing stopped; nothing more reaches the log", exc_info=task.exception())

    async def _publish(self, src: str, payload: bytes, msg_id: str, expected: int | None) -> None:
        """Publish until stored, with ``expected`` as the stream's last sequence (None: any);
        raises Fenced when the stream holds another writer's message after ``expected``."""
        from nats.errors import MaxPayloadError
        from nats.js.errors import APIError

        headers = {"Nats-Msg-Id": msg_id}
        if expected is not None:
            headers["Nats-Expected-Last-Sequence"] = str(expected)
        delay = 0.05
        while True:
            try:
                ack = await self.js.publish(SUBJECT_PREFIX + src, payload, stream=STREAM, headers=headers, timeout=2)
            except (asyncio.CancelledError, MaxPayloadError):
                raise  # too large is not a lost ack: retrying it would stall the log for ever
            except Exception as exc:  # no ack: it may or may not be stored; the same id makes it once
                if isinstance(exc, APIError) and exc.err_code == WRONG_LAST_SEQUENCE and expected is not None:
                    try:
                        seq = await self._stored_after(expected, msg_id)
                    except Fenced:
                        raise
                    except Exception as why:  # the server went away meanwhile: ask again
                        exc = why
                    else:
                        self.duplicates += 1  # stored by an attempt whose ack was lost
                        self.last_seq = seq
                        return
                self.retries += 1
                log.warning("ingest: publish of %s failed (%s); retrying", msg_id, exc)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            if ack.duplicate:
                self.duplicates += 1
            else:
                self.published += 1
            self.last_seq = max(self.last_seq, ack.seq)
            return

    async def _stored_after(self, expected: int, msg_id: str) -> int:
        """The stream refused ``msg_id`` because its last message is no longer ``expected``.
        When the message right after ``expected`` is ``msg_id`` itself (an earlier attempt was
        stored, its ack lost and the duplicate window passed), its sequence; otherwise another
        writer appended: raises Fenced."""
        from nats.js.errors import NotFoundError

        info = await self.js.stream_info(STREAM)
        if self.stream and stream_identity(info) not in ("", self.stream):
            raise Fenced(f"stream {STREAM} was deleted and created again since this ingest claimed it")
        try:
            nxt = await self.js.get_msg(STREAM, expected + 1)
        except NotFoundError:
            nxt = None
        other = (nxt.headers or {}).get("Nats-Msg-Id", "?") if nxt is not None else "?"  # "?": purged since
        if other == msg_id:
            return expected + 1
        raise Fenced(f"another ingest writes to stream {STREAM}: message {expected + 1} (id {other}; the stream "
                     f"is at {info.state.last_seq}) follows our last one ({expected}); this ingest is incarnation "
                     f"{self.inc}")

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish what is pending (up to ``timeout``), then disconnect."""
        if self._task is not None:
            await self.flushed(timeout)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.nc is not None:
            try:
                await self.nc.close()
            except Exception:  # already gone
                pass
            self.nc = None

    def stats(self) -> dict[str, Any]:
        return {"incarnation": self.inc, "published": self.published, "duplicates": self.duplicates,
                "retries": self.retries, "resent": self.resent, "last_seq": self.last_seq,
                "claim_seq": self.claim_seq, "fenced": self.fenced,
                "pending": len(self._outbox) + len(self._buffers)}
