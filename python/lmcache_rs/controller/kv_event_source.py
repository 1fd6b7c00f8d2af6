"""Engines' KV-cache event streams (vLLM, SGLang) as a source of the controller.

Each configured subscription is a ZMQ SUB socket, bound (engines connect to it: one socket
takes a whole fleet) or connected to one engine's PUB, plus optionally that engine's replay
ROUTER. A message is ``[topic, seq (8 bytes big-endian), payload]``; every publisher (one
engine's data-parallel rank) numbers its messages from 0.

Sequence rules, per publisher:
- the next number: applied;
- a jump ahead (messages lost; or the first message seen is not 0): the missing ones are
  asked from the replay socket and applied in order, live messages wait meanwhile;
- the replay no longer has them (its ring moved on), or there is no replay socket: the
  engine's holdings are dropped and it is marked ``stale``: from then on only what arrives
  is known, so lookups may miss its older blocks but never report blocks it lost. It is
  exact again after its next ``AllBlocksCleared`` or restart;
- a number that goes back: the engine restarted and holds nothing any more: its holdings
  are dropped and the new stream applies from there.

At start, a subscription with a replay endpoint asks for everything from 0, so a controller
that restarts rebuilds what the engines buffered (vLLM keeps ``buffer_steps`` batches).
Nothing a peer sends is trusted: frames are capped (ZMQ_MAXMSGSIZE), payloads decoded
tolerantly (kv_events.py), and nothing undecodable reaches an index.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import zmq
import zmq.asyncio

from .. import EngineOps, Index
from ..log_limit import RateLimitedLog
from .engine_blocks import EngineBlocks, Namespace, Namespaces
from .burst_reader import BurstReader
from .kv_events import Batch, BatchError, EventDecoder
from .metrics import settle_writes
from .operations import OperationError
from .registry import Registry, WorkerRecord

log = logging.getLogger("lmcache_rs.controller.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)
# Applied messages remembered per publisher: a message behind the sequence that is one of
# these is a late copy (a live message queued while its replay ran), not an engine restart.
RECENT_SEQS = 4096
MAX_REPLAY_ATTEMPTS = 3  # replays in a row for one gap before its messages count as lost
TOPIC_PATTERN = re.compile(r"^kv@([^@]+)@(.+)$")  # llm-d's convention: kv@<pod>@<model>
DEFAULT_MODEL = "default"
LIVE_BURST = 64  # queued live messages applied before their index writes (and the next await)
def offset_port(endpoint: str, rank: int) -> str:
    """A data-parallel rank's endpoint: vLLM offsets the port by the rank."""
    if rank == 0:
        return endpoint
    m = re.match(r"^(tcp://.*:)(\d+)$", endpoint)
    if m is None:
        return f"{endpoint}_dp{rank}"
    return f"{m.group(1)}{int(m.group(2)) + rank}"


class Publisher:
    """One engine's stream (one data-parallel rank): where it is, what it holds."""

    __slots__ = ("subscription", "topic", "rank", "instance_id", "engine", "record", "expected", "replaying",
                 "held", "stale", "batches", "events", "gaps", "replays", "restarts", "last_message", "checked",
                 "recent", "probing")

    def __init__(self, subscription: Subscription, topic: bytes, rank: int, instance_id: str, engine: EngineBlocks,
                 record: WorkerRecord):
        self.subscription = subscription
        self.topic = topic
        self.rank = rank
        self.instance_id = instance_id
        self.engine = engine
        self.record = record
        self.expected: int | None = None  # the seq applied next; None: nothing seen yet
        self.replaying = False
        self.held: list[tuple[int, Batch]] = []  # live messages waiting for a replay
        self.stale: str | None = None
        self.batches = 0
        self.events = 0  # events of the batches applied
        self.gaps = 0
        self.replays = 0
        self.restarts = 0
        self.last_message = time.monotonic()
        self.checked = False  # the replay socket was asked for a silent tail since the last message
        self.recent: dict[int, int] = {}  # seq -> payload digest of the last RECENT_SEQS applied
        self.probing = False  # the replay running is an idle check: in-sequence live messages go on

    def describe(self) -> dict:
        return {"instance_id": self.instance_id, "topic": self.topic.decode(errors="replace"),
                "dp_rank": self.rank, "next_seq": self.expected, "replaying": self.replaying,
                "stale": self.stale, "batches": self.batches, "events": self.events, "gaps": self.gaps, "replays": self.replays,
                "restarts": self.restarts, "blocks": len(self.engine)}


class Subscription:
    __slots__ = ("spec", "sub", "replay_lock", "starting", "held")

    def __init__(self, spec: dict):
        self.spec = spec
        self.sub: zmq.asyncio.Socket | None = None
        self.replay_lock = asyncio.Lock()
        self.starting = False  # the start-up replay runs: live messages wait in ``held``
        self.held: list[tuple[bytes, int, bytes]] = []

    @property
    def endpoint(self) -> str:
        return self.spec.get("bind") or self.spec["connect"]


class KVEventSource:
    """Every subscription, the publishers seen on them, and the namespaces they fill."""

    def __init__(self, settings: Any, registry: Registry, metrics: Any):
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.subscriptions = [Subscription(spec) for spec in settings.kv_events]
        self.namespaces = Namespaces(settings.hash_seed)
        self.publishers: dict[str, Publisher] = {}  # instance id (with its -dp<r>) -> its stream
        self._identities: dict[tuple[int, bytes], tuple[str | None, str]] = {}  # (subscription, topic) -> (instance, model)
        self.decoder = EventDecoder()
        self.counts: dict[str, int] = {}  # what could not be applied, by reason
        self.ctx: zmq.asyncio.Context | None = None
        self.tasks: set[asyncio.Task] = set()
        self.index = None  # no single key space: see ``namespaces``
        self._warn = RateLimitedLog(log)
        self._stale_count = 0  # publishers marked stale (read by lookups on any thread)
        # engines whose index writes wait for the end of a burst of live messages (None: none is running)
        self._deferred: dict[int, EngineBlocks] | None = None

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        try:
            for sub in self.subscriptions:
                sock = self.ctx.socket(zmq.SUB)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, self.settings.kv_events_max_message_bytes)
                sock.setsockopt(zmq.RCVHWM, 0)  # never drop here: a lost message costs a replay
                sock.setsockopt(zmq.SUBSCRIBE, sub.spec.get("topic", "").encode())
                if "bind" in sub.spec:
                    sock.bind(sub.spec["bind"])
                else:
                    sock.connect(sub.spec["connect"])
                sub.sub = sock
        except zmq.ZMQError as exc:
            self.close_sockets()
            raise OSError(f"cannot open the KV-event socket {sub.endpoint}: {exc}") from None
        for position, sub in enumerate(self.subscriptions):
            if sub.spec.get("replay_endpoint"):
                sub.starting = True
                self._spawn(self._startup_replay(position, sub))
            self._spawn(self._live_loop(position, sub))
            log.info("KV events: %s %s (topic %r, replay %s)", "bound" if "bind" in sub.spec else "connected to",
                     sub.endpoint, sub.spec.get("topic", ""), sub.spec.get("replay_endpoint", "none"))
        self._spawn(self._idle_checks())

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = set()
        self.close_sockets()

    def close_sockets(self) -> None:
        for sub in self.subscriptions:
            if sub.sub is not None:
                sub.sub.close(linger=0)
                sub.sub = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    # -- what the rest of the controller asks ----------------------------------------------
    def lookup_namespaces(self, model: str | None, lora_name: str | None, cache_salt: str | None) -> list[Namespace]:
        return [ns for ns in self.namespaces.matching(model, lora_name, cache_salt) if ns.engines]

    def stale_instances(self) -> dict[str, str]:
        # read by lookups on other threads while the main loop adds publishers: copy first
        return {p.instance_id: p.stale for p in list(self.publishers.values()) if p.stale}

    @property
    def any_stale(self) -> bool:
        return self._stale_count > 0

    def _mark_stale(self, pub: Publisher, reason: str | None) -> None:
        self._stale_count += (reason is not None) - (pub.stale is not None)
        pub.stale = reason

    def describe(self) -> list[dict]:
        return [p.describe() for p in self.publishers.values()]

    def skipped(self) -> dict[str, int]:
        """Events and messages not applied, by reason: the decoder's and this source's counts."""
        out = dict(self.decoder.counts)  # the decoder and the source count some reasons both
        for reason, n in self.counts.items():
            out[reason] = out.get(reason, 0) + n
        return out

    def register_worker(self, instance_id: str, worker_id: int) -> None:
        """Registry hook: namespaces register the engine when its first block arrives."""

    def remove_worker(self, instance_id: str, worker_id: int) -> int:
        """Registry hook: the engine leaves; drop what it held everywhere."""
        dropped = 0
        for ns in self.namespaces.all():
            if instance_id in ns.engines:
                dropped += ns.index.remove_worker(instance_id, worker_id)
                ns.engines.discard(instance_id)
        pub = self.publishers.pop(instance_id, None)
        if pub is not None:
            pub.engine.forget()
            self._mark_stale(pub, None)
        return dropped

    async def call(self, record: WorkerRecord, op: str, args: dict) -> Any:
        raise OperationError(409, f"instance {record.instance_id!r} is known from its KV-cache events only; "
                                  f"it takes no commands ({op})")

    async def move(self, *args: Any, **kwargs: Any) -> None:
        raise OperationError(409, "instances known from KV-cache events take no commands (move)")

    # -- live stream -----------------------------------------------------------------------
    async def _live_loop(self, position: int, sub: Subscription) -> None:
        assert sub.sub is not None
        # While messages keep coming, the indexes apply each burst's writes on their own thread
        # while this one reads and maps the next (see burst_reader.py).
        reader = BurstReader(sub.sub, self.settle)
        try:
            while True:
                frames = await reader.next()
                # Then whatever else is queued, without a trip through the event loop each, and
                # with one index write per namespace for the lot (``_flush``).
                self._deferred = {}
                try:
                    self._live_message(position, sub, frames)
                    for _ in range(LIVE_BURST - 1):
                        more = reader.waiting()
                        if more is None:
                            break
                        self._live_message(position, sub, more)
                finally:
                    self._flush()
        finally:
            self.settle()  # an error ends the loop: what it queued is still applied and counted

    def settle(self) -> None:
        """Wait for the writes the indexes apply behind the live loops; count them."""
        for ns in self.namespaces.all():
            if not (isinstance(ns.index, Index) and ns.index.writes_behind):
                continue
            failed = settle_writes(ns.index, self.metrics)
            if failed is not None:  # a bug: those writes are lost, as a direct write would have raised
                self._count("handler_errors")
                self._warn("KV events: index writes applied behind the live loop failed: %s", failed)

    def _live_message(self, position: int, sub: Subscription, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._count("bad_frames")
            self._warn("KV events on %s: dropped a message of %d frames (expected topic, seq, payload)",
                       sub.endpoint, len(frames))
            return
        topic, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big")
        if sub.starting:
            if len(sub.held) < self.settings.kv_events_max_replay:
                sub.held.append((topic, seq, payload))
            else:
                self._count("held_overflow")  # seen as a gap once the start-up replay is done
            return
        self._guarded(position, sub, topic, seq, payload)

    def _guarded(self, position: int, sub: Subscription, topic: bytes, seq: int, payload: bytes) -> None:
        """``receive``, and a bug it may hit costs one message, never the socket's loop."""
        try:
            self.receive(position, sub, topic, seq, payload)
        except Exception as exc:
            self._count("handler_errors")
            log.exception("KV events on %s: a message failed (%s); it is dropped", sub.endpoint, exc)

    def receive(self, position: int, sub: Subscription, topic: bytes, seq: int, payload: bytes) -> None:
        """One live message of subscription number ``position``."""
        batch = self._decode(sub, payload)
        if batch is None:
            return
        pub = self._publisher(position, sub, topic, batch.dp_rank)
        if pub is None:
            return
        pub.last_message = time.monotonic()
        pub.checked = False
        if pub.replaying and not (pub.probing and seq == pub.expected):
            if len(pub.held) < self.settings.kv_events_max_replay:
                pub.held.append((seq, batch))
            else:
                self._count("held_overflow")  # a gap once the replay is done: asked again or lost
            return
        if pub.expected is None:
            if seq == 0:
                self._apply(pub, seq, batch)
            else:
                self._recover(pub, 0, seq, batch, "joined mid-stream")
        elif seq == pub.expected:
            self._apply(pub, seq, batch)
        elif seq < pub.expected and pub.recent.get(seq) == batch.digest:
            self._count("late_duplicates")
        elif seq < pub.expected:
            self._restarted(pub, f"seq {seq} after {pub.expected - 1}")
            if seq == 0:
                self._apply(pub, seq, batch)
            else:
                self._recover(pub, 0, seq, batch, "restarted")
        else:
            pub.gaps += 1
            self._recover(pub, pub.expected, seq, batch, f"messages {pub.expected}..{seq - 1} lost")

    def _restarted(self, pub: Publisher, why: str) -> None:
        """The engine started over: it holds nothing it held before."""
        pub.restarts += 1
        log.info("KV events: %s restarted (%s); its holdings are dropped", pub.instance_id, why)
        self._drop(pub)
        pub.recent.clear()
        pub.expected = None
        self._mark_stale(pub, None)  # dropping everything is exact for a new engine

    def _decode(self, sub: Subscription, payload: bytes) -> Batch | None:
        try:
            return self.decoder.decode(payload)
        except BatchError as exc:
            self._count("decode_errors")
            self._warn("KV events on %s: dropped a payload of %d bytes: %s", sub.endpoint, len(payload), exc)
            return None

    def _publisher(self, position: int, sub: Subscription, topic: bytes, rank: int) -> Publisher | None:
        identity = self._identities.get((position, topic))
        if identity is None:
            if len(self._identities) >= self.settings.kv_events_max_publishers:
                self._count("too_many_publishers")
                return None
            identity = self._identities[(position, topic)] = self._identify(sub, topic)
        instance_id, model = identity
        if instance_id is None:
            self._count("unidentified_publishers")
            self._warn("KV events on %s: a publisher with topic %r has no instance id (set the subscription's "
                       "instance_id, or publish with topic kv@<instance>@<model>; replays of vLLM before 0.26 "
                       "carry no topic)", sub.endpoint, topic)
            return None
        if rank:
            instance_id = f"{instance_id}-dp{rank}"
        pub = self.publishers.get(instance_id)
        if pub is not None:
            if pub.subscription is sub and pub.rank == rank:
                return pub
            # another stream under the same name: two engines must never write one holder
            self._count("instance_conflicts")
            self._warn("KV events on %s: topic %r rank %d names instance %s, which another stream already "
                       "reports; dropped", sub.endpoint, topic, rank, instance_id)
            return None
        if len(self.publishers) >= self.settings.kv_events_max_publishers:
            self._count("too_many_publishers")
            return None
        try:
            record = self.registry.add_external(self, instance_id, 0)
        except ValueError as exc:
            self._count("instance_conflicts")
            self._warn("KV events on %s: publisher %s refused: %s", sub.endpoint, instance_id, exc)
            return None
        engine = EngineBlocks(instance_id, model, self.namespaces, self.counts)
        pub = self.publishers[instance_id] = Publisher(sub, topic, rank, instance_id, engine, record)
        log.info("KV events: publisher %s (model %s, topic %r, dp rank %d) on %s", instance_id, model, topic,
                 rank, sub.endpoint)
        return pub

    @staticmethod
    def _identify(sub: Subscription, topic: bytes) -> tuple[str | None, str]:
        text = topic.decode(errors="replace")
        m = TOPIC_PATTERN.match(text)
        instance_id = sub.spec.get("instance_id") or (m.group(1) if m else text or None)
        model = sub.spec.get("model") or (m.group(2) if m else DEFAULT_MODEL)
        return instance_id, model

    # -- applying --------------------------------------------------------------------------
    def _apply(self, pub: Publisher, seq: int, batch: Batch) -> None:
        if batch.parsed is not None:
            pub.engine.apply_parsed(batch.parsed)
        else:
            pub.engine.apply(batch.events)
        if pub.stale is not None and batch.cleared:
            self._mark_stale(pub, None)  # the engine starts over from nothing: exact again
        pub.expected = seq + 1
        recent = pub.recent
        recent[seq] = batch.digest
        if len(recent) > RECENT_SEQS:
            del recent[next(iter(recent))]  # the oldest applied (dicts keep insertion order)
        pub.batches += 1
        pub.events += len(batch.parsed) if batch.parsed is not None else len(batch.events)
        self._write(pub.engine)
        self.registry.touch(pub.record)

    def _write(self, engine: EngineBlocks) -> None:
        """The engine's queued index operations, applied now (during a live burst: by ``_flush``)."""
        if self._deferred is not None:
            self._deferred[id(engine)] = engine
            return
        ops = engine.take_ops()
        for ns, batch in ops:
            self._apply_now(ns, batch)
        if ops:
            self.registry.changes += 1

    def _apply_now(self, ns: Namespace, batch: EngineOps) -> None:
        """Write ``batch`` to the namespace's index now and count it."""
        admitted, evicted = batch.apply_to(ns.index)
        self.metrics.admits += admitted
        self.metrics.evicts += evicted

    def _flush(self) -> None:
        """The index writes a burst of live messages deferred: per namespace, every engine's
        operations joined into one write queued for the index's write-behind thread (which then
        wakes once a burst, not once an engine; ``settle`` counts them). An index that records
        what it applies (not a plain ``Index``) is written at once."""
        deferred, self._deferred = self._deferred, None
        queued: dict[int, tuple[Namespace, list[EngineOps]]] = {}
        for engine in (deferred or {}).values():
            try:
                ops = engine.take_ops()
                for ns, batch in ops:
                    if isinstance(ns.index, Index):
                        queued.setdefault(ns.number, (ns, []))[1].append(batch)
                    else:
                        self._apply_now(ns, batch)
                if ops:
                    self.registry.changes += 1
            except Exception as exc:  # a bug costs this engine's writes, never the socket's loop
                self._count("handler_errors")
                log.exception("KV events: index writes for %s failed (%s)", engine.instance_id, exc)
        for ns, batches in queued.values():
            try:
                ns.index.start_write_behind()  # once per index; later calls do nothing
                joined = batches[0] if len(batches) == 1 else EngineOps.join(batches)
                joined.apply_later(ns.index)
            except Exception:
                self._queue_each(ns, batches)  # a bug: then one bad batch costs its own writes only

    def _queue_each(self, ns: Namespace, batches: list[EngineOps]) -> None:
        for batch in batches:
            try:
                batch.apply_later(ns.index)
            except Exception as exc:  # a bug costs this engine's writes, never the socket's loop
                self._count("handler_errors")
                log.exception("KV events: index writes for namespace %s failed (%s)", ns.describe(), exc)

    def _drop(self, pub: Publisher) -> None:
        pub.engine.clear()
        self._write(pub.engine)

    def _lose(self, pub: Publisher, reason: str) -> None:
        """Messages are gone for good: forget the engine's holdings and mark it stale."""
        self._count("unrecoverable_gaps")
        self._warn("KV events: %s lost messages that cannot be replayed (%s); its holdings are dropped and "
                   "rebuilt from what comes next", pub.instance_id, reason)
        self._drop(pub)
        self._mark_stale(pub, reason)

    # -- gaps and replay -------------------------------------------------------------------
    async def _idle_checks(self) -> None:
        """A lost message shows as a gap only when the next one arrives, and an idle engine
        sends none: once a publisher has been quiet for ``kv_events_idle_check`` s, ask its
        replay socket for anything after the last message applied."""
        interval = self.settings.kv_events_idle_check
        while True:
            await asyncio.sleep(interval / 4)
            now = time.monotonic()
            for pub in list(self.publishers.values()):
                endpoint = pub.subscription.spec.get("replay_endpoint")
                if (endpoint and not pub.checked and not pub.replaying and pub.expected is not None
                        and now - pub.last_message >= interval):
                    pub.checked = True
                    self._start_replay(pub, pub.expected, "a message lost while idle", probing=True)

    def _recover(self, pub: Publisher, start: int, seq: int, batch: Batch, why: str) -> None:
        endpoint = pub.subscription.spec.get("replay_endpoint")
        if not endpoint:
            self._lose(pub, f"{why}; no replay endpoint")
            self._apply(pub, seq, batch)
            return
        pub.held = [(seq, batch)]
        self._start_replay(pub, start, why)

    def _start_replay(self, pub: Publisher, start: int, why: str, attempt: int = 1, probing: bool = False) -> None:
        endpoint = pub.subscription.spec["replay_endpoint"]
        pub.replaying = True
        pub.probing = probing
        pub.replays += 1
        self._spawn(self._replay_publisher(pub, offset_port(endpoint, pub.rank), start, why, attempt))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _replay_publisher(self, pub: Publisher, endpoint: str, start: int, why: str, attempt: int) -> None:
        # Ask from the last message applied too: if the engine sends another one under that
        # number, it restarted meanwhile (its numbers start over) and what it holds is new.
        check = start - 1 if start > 0 and (start - 1) in pub.recent else None
        try:
            replies = await self._replay(pub.subscription, endpoint, start if check is None else check)
        except (zmq.ZMQError, TimeoutError, ValueError) as exc:
            self._count("replay_failures")
            replies = []
            why = f"{why}; replay from {endpoint} failed: {exc}"
        try:
            if self._apply_replay(pub, replies, check, why, attempt):
                return  # another replay was started and owns the held messages
        except Exception as exc:  # a bug costs this replay's messages, never the publisher
            self._count("handler_errors")
            log.exception("KV events: replay for %s failed (%s)", pub.instance_id, exc)
            pub.held = []
            pub.replaying = pub.probing = False

    def _apply_replay(self, pub: Publisher, replies: list, check: int | None, why: str, attempt: int) -> bool:
        """Apply a replay's messages, then the live ones held meanwhile. True when another
        replay was started (a restart seen, or a gap left among the held messages)."""
        for _topic, seq, payload in replies:
            batch = self._decode(pub.subscription, payload)
            if batch is None:
                continue
            if batch.dp_rank != pub.rank:  # a replay socket serves one rank; never mix another's in
                self._count("replayed_other_rank")
                continue
            if seq == check and batch.digest != pub.recent.get(seq):
                self._restarted(pub, f"its message {seq} changed")
                self._start_replay(pub, 0, "restarted", attempt)
                return True
            self._in_order(pub, seq, batch, why)
        held, pub.held = pub.held, []
        pub.replaying = pub.probing = False
        for i, (seq, batch) in enumerate(held):
            expected = pub.expected if pub.expected is not None else 0
            if seq > expected and replies and attempt < MAX_REPLAY_ATTEMPTS:
                # published after the replay answered: ask again for the rest
                pub.held = held[i:]
                self._start_replay(pub, expected, why, attempt + 1)
                return True
            self._in_order(pub, seq, batch, why)
        return False

    def _in_order(self, pub: Publisher, seq: int, batch: Batch, why: str) -> None:
        """Apply a replayed or held message when it is the next one; skip one already applied;
        a later one means the ones between are gone."""
        expected = pub.expected if pub.expected is not None else 0
        if seq < expected:
            return
        if seq > expected:
            self._lose(pub, f"{why}; messages {expected}..{seq - 1} are no longer buffered")
        self._apply(pub, seq, batch)

    async def _replay(self, sub: Subscription, endpoint: str, start: int) -> list[tuple[bytes | None, int, bytes]]:
        """Everything ``endpoint`` still buffers from ``start`` on, as (topic, seq, payload)
        (both reply shapes: vLLM ≥ 0.26 sends the topic frame, older releases do not: None)."""
        assert self.ctx is not None
        timeout = self.settings.kv_events_replay_timeout
        async with sub.replay_lock:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.settings.kv_events_max_message_bytes)
            try:
                sock.connect(endpoint)
                await sock.send_multipart([b"", start.to_bytes(8, "big")])
                out: list[tuple[bytes | None, int, bytes]] = []
                while True:
                    if not await sock.poll(timeout * 1000):
                        raise TimeoutError(f"no reply within {timeout:g} s")
                    frames = await sock.recv_multipart(copy=True)
                    if frames and frames[0] == b"":
                        frames = frames[1:]
                    topic = frames.pop(0) if len(frames) == 3 else None
                    if len(frames) != 2 or len(frames[0]) != 8:
                        raise ValueError(f"a replay reply of {len(frames)} frames")
                    if frames[0] == END_SEQ:
                        return out
                    out.append((topic, int.from_bytes(frames[0], "big"), frames[1]))
                    if len(out) > self.settings.kv_events_max_replay:
                        raise ValueError(f"more than {self.settings.kv_events_max_replay} replayed messages")
            finally:
                sock.close(linger=0)

    async def _startup_replay(self, position: int, sub: Subscription) -> None:
        """Rebuild from the engine's replay buffer before applying the live stream."""
        endpoint = sub.spec["replay_endpoint"]
        try:
            try:
                replies = await self._replay(sub, endpoint, 0)
            except (zmq.ZMQError, TimeoutError, ValueError) as exc:
                self._count("replay_failures")
                log.warning("KV events: start-up replay from %s failed (%s); following the live stream only",
                            endpoint, exc)
                replies = []
            why = "the controller started after the engine's replay buffer moved on"
            for topic, seq, payload in replies:
                try:
                    batch = self._decode(sub, payload)
                    if batch is None:
                        continue
                    topic = topic if topic is not None else sub.spec.get("topic", "").encode()
                    pub = self._publisher(position, sub, topic, batch.dp_rank)
                    if pub is not None:
                        self._in_order(pub, seq, batch, why)
                except Exception as exc:
                    self._count("handler_errors")
                    log.exception("KV events: a replayed message from %s failed (%s); it is dropped", endpoint, exc)
            log.info("KV events: start-up replay from %s: %d messages", endpoint, len(replies))
        finally:
            held, sub.held = sub.held, []
            sub.starting = False
            for topic, seq, payload in held:
                self._guarded(position, sub, topic, seq, payload)
