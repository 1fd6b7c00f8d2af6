"""Workers known to the controller and the path from their reports into the index.

Each worker is a :class:`WorkerRecord` keyed by ``(instance_id, worker_id)``. What its report
connection says moves it through three states, in the record's own methods:

``need_sync``  after ``hello`` or a sequence gap: ``events`` are ignored;
``syncing``    between ``sync_start`` and ``sync_end``: keys and later events are buffered;
``live``       ``events`` are applied when their ``seq`` is the next one expected.

The registry knows a report connection only as a :class:`ReportLink` (the monitor's
protocol object implements it), so it imports nothing of the monitor.

Tensor parallelism: our workers' hello names the instance's ``world_size`` N. At the first
hello of an instance every rank 0..N-1 is registered in the index, so the instance matches a
chunk only when all N hold it (the index requires every registered worker of an instance).
A rank whose connection drops has its holdings dropped at once (the instance stops matching
until it returns and syncs); a rank that expires or says bye leaves an empty registration
behind while other ranks of its instance are known, so the remaining ranks never match
alone. The instance's registrations go when its last rank does. A hello with another world
size is refused while another rank of the instance is connected.

Workers of other sources (LMCache's ZMQ protocol) live here too, so instances, commands and
the HTTP API see one set of workers; such a record names its ``source``, which owns its
liveness and its commands, and its holdings are in that source's key space (``index_of``).
An instance id belongs to one key space: a worker of another source that claims it is refused.

Ingest is coalesced: event frames validated in one loop iteration are applied with one
``Index.apply_batch`` call scheduled with ``call_soon``. A full sync replaces the worker's
holdings at ``sync_end`` with one ``apply_batch``: a ``drop`` of everything the worker
holds (it stays registered), the synced keys, then the events buffered during the sync.
The index publishes a batch at once, so no lookup, on any thread, sees the worker
half-replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from ..wire import report
from .metrics import Metrics

if TYPE_CHECKING:  # pragma: no cover
    from ..wire import Session

log = logging.getLogger("lmcache_rs.controller")

NEED_SYNC = "need_sync"
SYNCING = "syncing"
LIVE = "live"

Event = tuple  # ("admit" | "evict", instance_id, worker_id, location, hashes bytes)

# what on_events decided about a frame
IGNORED = "ignored"  # waiting for a sync: dropped
GAP = "gap"  # out of sequence: the worker must resync
APPLY = "apply"  # live: apply now
BUFFERED = "buffered"  # syncing: applied after the synced set


class SyncTooLarge(ValueError):
    """Staging this sync would take the syncs in progress over their byte budget."""


class SyncBudget:
    """Bytes of keys staged by all full syncs in progress (and the events buffered during
    them), bounded: the controller's memory for syncs does not grow with what workers send."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self, nbytes: int) -> None:
        if self.used + nbytes > self.limit:
            raise SyncTooLarge(f"full syncs in progress would hold more than {self.limit} bytes of keys "
                               "(--max-sync-bytes); retry later, or raise the limit for workers this large")
        self.used += nbytes

    def give_back(self, nbytes: int) -> None:
        self.used -= nbytes


class WorkerInUse(ValueError):
    """A hello for a worker whose identity another live connection holds."""


class ReportLink(Protocol):
    """A worker's report connection, as the registry sees it."""

    peer: str  # the remote address, for messages

    def detach(self, replaced: bool) -> None:
        """Forget the worker (a newer connection took over, or it was removed) and close."""

    def resync(self, reason: str) -> None:
        """Ask the worker for a full sync."""


class WorkerRecord:
    __slots__ = (
        "instance_id", "worker_id", "host", "worker_port", "p2p_host", "p2p_port",
        "conn", "state", "expected_seq", "sync_chunks", "sync_keys", "sync_events",
        "registered_at", "last_seen", "last_seen_wall", "disconnected_at", "command", "syncs", "source",
        "sync_bytes", "budget", "sync_started",
    )

    def __init__(self, instance_id: str, worker_id: int, source: Any = None, budget: SyncBudget | None = None):
        self.instance_id = instance_id
        self.worker_id = worker_id
        self.host = ""
        self.worker_port = 0
        self.p2p_host = ""
        self.p2p_port = 0
        self.conn: ReportLink | None = None
        self.state = NEED_SYNC
        self.expected_seq = 0
        self.sync_chunks: list[tuple[str, bytes]] = []
        self.sync_keys = 0
        self.sync_events: list[Event] = []
        self.sync_bytes = 0  # staged in sync_chunks and sync_events, counted in the budget
        self.budget = budget if budget is not None else SyncBudget(2**63)
        self.sync_started = 0.0  # monotonic time of the sync_start of the sync running (SYNCING)
        self.registered_at = time.time()
        self.last_seen = time.monotonic()
        self.last_seen_wall = time.time()
        self.disconnected_at: float | None = None
        self.command: Session | None = None  # command connection, opened on first use
        self.syncs = 0
        # None: our own worker on the monitor port; else the source adapter that reports it
        self.source = source

    @property
    def key(self) -> tuple[str, int]:
        return (self.instance_id, self.worker_id)

    # -- sync state: the transitions the report connection drives ---------------------------
    def reset_sync(self) -> None:
        self.sync_chunks = []
        self.sync_keys = 0
        self.sync_events = []
        self.budget.give_back(self.sync_bytes)
        self.sync_bytes = 0

    def _stage(self, nbytes: int) -> None:
        self.budget.take(nbytes)  # raises SyncTooLarge
        self.sync_bytes += nbytes

    def need_sync(self) -> None:
        """After hello, a gap or a lost connection: ignore events until the next sync."""
        self.state = NEED_SYNC
        self.reset_sync()

    def begin_sync(self, seq: int) -> None:
        """sync_start: buffer keys; the events frame after the snapshot has ``seq + 1``."""
        self.reset_sync()
        self.state = SYNCING
        self.sync_started = time.monotonic()
        self.expected_seq = seq + 1

    def add_sync_chunk(self, location: str, hashes: bytes) -> None:
        """A sync_chunk; the tail of an abandoned sync (not syncing) is dropped."""
        if self.state == SYNCING:
            self._stage(len(hashes))
            self.sync_chunks.append((location, hashes))
            self.sync_keys += len(hashes) // 8

    def on_events(self, seq: int, events: list[Event]) -> str:
        """What to do with a valid events frame: IGNORED, GAP, APPLY (now) or BUFFERED
        (kept for the end of the sync). Advances the expected seq."""
        if self.state == NEED_SYNC:
            return IGNORED
        if seq != self.expected_seq:
            return GAP
        self.expected_seq = seq + 1
        if self.state == LIVE:
            return APPLY
        self._stage(sum(len(event[4]) for event in events))
        self.sync_events.extend(events)
        return BUFFERED

    def heartbeat_in_step(self, seq: int) -> bool:
        """Whether a heartbeat's last seq agrees with the events received."""
        return self.state == NEED_SYNC or seq == self.expected_seq - 1

    def synced(self) -> None:
        """The synced set was applied: the worker is live."""
        self.reset_sync()
        self.state = LIVE
        self.syncs += 1


class Registry:
    """Workers by (instance_id, worker_id), and the coalescing writer into the index."""

    def __init__(self, index: Any, metrics: Metrics, heartbeat_timeout: float, max_sync_bytes: int = 256 << 20,
                 sync_timeout: float = 120.0):
        self.index = index  # our workers' key space
        self.metrics = metrics
        self.heartbeat_timeout = heartbeat_timeout
        # a sync not ended within this is abandoned: its staged keys would hold the shared budget
        self.sync_timeout = sync_timeout
        self.workers: dict[tuple[str, int], WorkerRecord] = {}
        self.world_sizes: dict[str, int] = {}  # our instances: ranks registered in the index
        self.sync_budget = SyncBudget(max_sync_bytes)
        # workers per source (None: ours): which key spaces a lookup must ask
        self.by_source: dict[Any, int] = {}
        self._pending: list[Event] = []
        self._pending_frames = 0
        self._flush_handle: asyncio.Handle | None = None
        self.changes = 0  # bumped by every write to the index (for snapshots)

    # -- membership ------------------------------------------------------------------------
    def instance_workers(self, instance_id: str) -> list[WorkerRecord]:
        """Workers of an instance, by rank."""
        return sorted((r for r in self.workers.values() if r.instance_id == instance_id), key=lambda r: r.worker_id)

    def instances(self) -> dict[str, list[WorkerRecord]]:
        out: dict[str, list[WorkerRecord]] = {}
        for record in sorted(self.workers.values(), key=lambda r: (r.instance_id, r.worker_id)):
            out.setdefault(record.instance_id, []).append(record)
        return out

    def index_of(self, record: WorkerRecord) -> Any:
        """The index holding this worker's chunks (its source's key space); None for a source
        whose workers span several (engine event namespaces)."""
        return self.index if record.source is None else record.source.index

    def owner_of(self, instance_id: str) -> Any:
        """(True, source) of the instance's workers, or (False, None) when it has none."""
        for record in self.workers.values():
            if record.instance_id == instance_id:
                return True, record.source
        return False, None

    def add_external(self, source: Any, instance_id: str, worker_id: int) -> WorkerRecord:
        """Register a worker that ``source`` reports. Raises ValueError when the instance id is
        taken by workers of another source, or the index refuses the name."""
        found, owner = self.owner_of(instance_id)
        if found and owner is not source:
            raise ValueError(f"instance id {instance_id!r} is already used by workers of another protocol")
        source.register_worker(instance_id, worker_id)
        record = WorkerRecord(instance_id, worker_id, source)
        self._add(record)
        return record

    def _add(self, record: WorkerRecord) -> None:
        self.workers[record.key] = record
        self.by_source[record.source] = self.by_source.get(record.source, 0) + 1

    def attach(self, conn: ReportLink, hello: report.Hello) -> WorkerRecord:
        """A worker said hello on ``conn``: (re)register it; it must full-sync next."""
        key = (hello.instance_id, hello.worker_id)
        record = self.workers.get(key)
        if record is not None and record.source is not None:
            raise ValueError(f"worker {key[0]}/{key[1]} is already registered through another protocol")
        found, owner = self.owner_of(key[0])
        if found and owner is not None:
            raise ValueError(f"instance id {key[0]!r} is already used by workers of another protocol")
        if record is not None and record.conn is not None and record.conn is not conn:
            # an identity sticks to its connection until that one closes or goes silent: without
            # an API key, this is what keeps a stranger from taking over a live rank
            raise WorkerInUse(f"worker {key[0]}/{key[1]} is connected already from {record.conn.peer} (command "
                              f"port {record.host}:{record.worker_port}); a new connection is accepted once that one "
                              "closes or is silent for the heartbeat timeout: two workers with the same "
                              "lmcache_instance_id and rank?")
        self._settle_world_size(hello, record)
        record = self.workers.get(key)  # gone if the instance was re-formed
        if record is None:
            record = WorkerRecord(*key, budget=self.sync_budget)
            self._add(record)
            log.info("worker %s/%d registered from %s:%d", key[0], key[1], hello.host, hello.worker_port)
        else:
            if (record.host, record.worker_port) != (hello.host, hello.worker_port) and record.command is not None:
                record.command.close()
                record.command = None
            log.info("worker %s/%d reconnected", *key)
        record.host = hello.host
        record.worker_port = hello.worker_port
        record.p2p_host = hello.p2p_host
        record.p2p_port = hello.p2p_port
        record.conn = conn
        record.disconnected_at = None
        record.need_sync()
        self.touch(record)
        return record

    def _settle_world_size(self, hello: report.Hello, record: WorkerRecord | None) -> None:
        """Register every rank of a new instance; refuse a world size that another connected
        rank contradicts; re-form an instance none of whose other ranks is connected."""
        instance_id, size = hello.instance_id, hello.world_size
        known = self.world_sizes.get(instance_id)
        if known == size:
            return
        if known is not None:
            connected = sorted(r.worker_id for r in self.instance_workers(instance_id)
                               if r.conn is not None and r is not record)
            if connected:
                raise ValueError(f"world_size {size} disagrees with the instance's {known} "
                                 f"(ranks {connected} connected with it); all ranks must share one world_size")
            log.info("instance %s re-formed: world_size %d -> %d", instance_id, known, size)
            self._remove_instance(instance_id, f"re-formed with world_size {size}")
        for rank in range(size):  # a name the index refuses raises here and leaves no record
            try:
                self.index.register_worker(instance_id, rank)
            except Exception:
                for registered in range(rank):
                    self.index.remove_worker(instance_id, registered)
                raise
        self.world_sizes[instance_id] = size
        self.changes += 1

    def _remove_instance(self, instance_id: str, reason: str) -> None:
        for record in self.instance_workers(instance_id):
            self.remove(record, reason)
        self._forget_instance(instance_id)

    def _forget_instance(self, instance_id: str) -> int:
        """Unregister every rank of an instance none of whose ranks is known any more."""
        dropped = 0
        for rank in range(self.world_sizes.pop(instance_id, 0)):
            dropped += self.index.remove_worker(instance_id, rank)
        self.changes += 1
        return dropped

    def _drop_holdings(self, record: WorkerRecord) -> int:
        """Empty a rank's holdings, keeping it registered: its instance stops matching."""
        self.flush()
        _, dropped = self.index.apply_batch([("drop", record.instance_id, record.worker_id, None, b"")])
        self.changes += 1
        return dropped

    def restore(self) -> int:
        """After loading a snapshot: its workers are known but not connected; each must come
        back within heartbeat_timeout (and full-sync) or its holdings are removed."""
        now = time.monotonic()
        restored = 0
        for instance_id, worker_ids in self.index.workers().items():
            if self.owner_of(instance_id)[1] is None:
                # every rank was registered at the first hello: the ranks are the world
                self.world_sizes.setdefault(instance_id, max(worker_ids) + 1)
            for worker_id in worker_ids:
                if (instance_id, worker_id) not in self.workers:
                    record = WorkerRecord(instance_id, worker_id, budget=self.sync_budget)
                    record.disconnected_at = now
                    self._add(record)
                    restored += 1
        return restored

    def touch(self, record: WorkerRecord) -> None:
        record.last_seen = time.monotonic()
        record.last_seen_wall = time.time()

    def detached(self, record: WorkerRecord) -> None:
        """The worker's connection dropped: its holdings stop counting at once (a rank that
        cannot be reached must not make its instance match); the record is kept for
        heartbeat_timeout, for the worker to come back and full-sync."""
        record.conn = None
        record.disconnected_at = time.monotonic()
        record.need_sync()
        dropped = self._drop_holdings(record)
        log.info("worker %s/%d disconnected: %d holdings dropped; kept for %g s", record.instance_id,
                 record.worker_id, dropped, self.heartbeat_timeout)

    def remove(self, record: WorkerRecord, reason: str) -> int:
        """Drop the worker and all its holdings now."""
        if self.workers.get(record.key) is not record:
            return 0
        self.flush()
        record.reset_sync()  # its staged sync, if any, leaves the budget
        del self.workers[record.key]
        self.by_source[record.source] = max(0, self.by_source.get(record.source, 0) - 1)
        if record.source is None:
            if self.instance_workers(record.instance_id):  # the rank stays registered, empty
                dropped = self._drop_holdings(record)
            elif record.instance_id in self.world_sizes:
                dropped = self._forget_instance(record.instance_id)
            else:
                dropped = self.index.remove_worker(record.instance_id, record.worker_id)
        else:
            dropped = record.source.remove_worker(record.instance_id, record.worker_id)
        self.changes += 1
        if record.command is not None:
            record.command.close()
            record.command = None
        conn, record.conn = record.conn, None
        if conn is not None:
            conn.detach(replaced=True)
        log.info("worker %s/%d removed (%s): %d holdings dropped", record.instance_id, record.worker_id, reason, dropped)
        return dropped

    def expire(self, now: float) -> None:
        """Remove workers silent (or gone) for longer than heartbeat_timeout."""
        timeout = self.heartbeat_timeout
        for record in list(self.workers.values()):
            if record.source is not None:
                continue  # its source decides when it is gone
            if record.conn is None:
                if record.disconnected_at is not None and now - record.disconnected_at > timeout:
                    self.metrics.workers_expired += 1
                    self.remove(record, "did not reconnect")
            elif now - record.last_seen > timeout:
                self.metrics.workers_expired += 1
                self.remove(record, f"silent for {timeout:g} s")
            elif record.state == SYNCING and now - record.sync_started > self.sync_timeout:
                # heartbeats alone keep a connection; a sync that never ends must not keep
                # its share of the sync budget from the other workers
                record.conn.resync(f"the full sync did not end within {self.sync_timeout:g} s")

    async def reached(self, record: WorkerRecord, seq: int, timeout: float) -> bool:
        """Wait until this worker's events frame ``seq`` has been applied to the index (True),
        or it is gone, reconnected or out of step (a full sync then sets its holdings), or
        ``timeout`` passes (False)."""
        conn = record.conn
        deadline = time.monotonic() + timeout
        while record.expected_seq <= seq:
            if (self.workers.get(record.key) is not record or record.conn is not conn or conn is None
                    or record.state != LIVE or time.monotonic() >= deadline):
                return False
            await asyncio.sleep(0.001)
        self.flush()
        return True

    # -- ingest ----------------------------------------------------------------------------
    def queue(self, events: list[Event]) -> None:
        """Apply these (already validated) events with the others of this loop iteration."""
        self._pending.extend(events)
        self._pending_frames += 1
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Apply what is queued now (also called before anything that must see it applied)."""
        handle, self._flush_handle = self._flush_handle, None
        if handle is not None:
            handle.cancel()
        pending, self._pending = self._pending, []
        frames, self._pending_frames = self._pending_frames, 0
        if not pending:
            return
        try:
            self.index.apply_batch(pending)
        except Exception as exc:  # validated before queuing; the index still has the last word
            log.error("index refused a batch of %d events (%s); applying frame by frame", len(pending), exc)
            for event in pending:
                try:
                    self.index.apply_batch([event])
                except Exception as exc2:
                    log.error("index refused %s for %s/%d at %s: %s", event[0], event[1], event[2], event[3], exc2)
                    record = self.workers.get((event[1], event[2]))
                    if record is not None and record.conn is not None:
                        record.conn.resync(f"index refused an event: {exc2}")
        self.changes += 1
        self.metrics.ingest_batches += 1
        self.metrics.ingest_frames += frames

    def replace_holdings(self, record: WorkerRecord) -> None:
        """sync_end: the synced keys (plus events sent during the sync) become the worker's holdings."""
        self.flush()
        events: list[Event] = []
        by_location: dict[str, list[bytes]] = {}
        for location, hashes in record.sync_chunks:
            by_location.setdefault(location, []).append(hashes)
        for location, parts in by_location.items():
            events.append(("admit", record.instance_id, record.worker_id, location,
                           parts[0] if len(parts) == 1 else b"".join(parts)))
        events.extend(record.sync_events)
        # One batch: drop everything the worker holds (it stays registered), then the synced
        # set and the events sent during the sync. Readers see the old holdings or the new.
        events.insert(0, ("drop", record.instance_id, record.worker_id, None, b""))
        self.changes += 1
        self.index.apply_batch(events)
        record.synced()
        self.metrics.syncs += 1
