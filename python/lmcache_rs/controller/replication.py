"""The two log roles of a controller: ``ingest`` writes the log, ``replica`` follows it.

Ingest: the controller runs its sources as in single mode, but each index it writes is a
RecordingIndex (oplog.py) whose operations go to the Publisher (ingest.py). Before the
sources start it rebuilds its indexes from the log: our workers are then known and
disconnected, exactly as after a snapshot load, and must come back (and full-sync) within
the heartbeat timeout; LMCache workers and engine publishers are removed at once and report
again (LMCache workers re-register, engines are replayed), since their sources keep state the
log does not hold. Only the ingest decides that a worker is gone; replicas apply its
decisions.

Replica: no sources, no monitor port. A Follower (follower.py) applies the log to the same
indexes the single controller would have, and the HTTP API answers from them. Workers are
those the indexes have registered. /healthz answers 503 until the replica has applied what
the stream held when it started. The endpoints that need the workers (/clear, /pin, /move,
/query_*, ...) go to the ingest by NATS request/reply (``lmc.cmd``); the replica answers
once it has applied the log up to what the ingest published while running the command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from typing import Any

from .follower import Follower
from .http import JSON, Request, error_body
from .ingest import Publisher
from .oplog import KV_PREFIX, SPACE_LMCACHE, SPACE_OURS, RecordingIndex, apply_message, kv_space, parse_kv_space
from .snapshots import SharedSnapshots, bootstrap, dump_local

log = logging.getLogger("lmcache_rs.controller")

CATCH_UP_TIMEOUT = 600.0
BOOTSTRAP_ATTEMPTS = 5
# commands replicas forward to the ingest (NATS request/reply; a queue group for a standby)
COMMAND_SUBJECT = "lmc.cmd"
COMMAND_QUEUE = "lmc-cmd"
EXIT_FENCED = 3
RECOVERY_CHECK = 1.0  # s between looks at whether a replica's follower stopped for good
RECOVERY_MAX_DELAY = 30.0  # s, the longest wait between failed recoveries  # the process's exit status when another ingest took the log over


def _inner(index: Any) -> Any:
    return index.inner if isinstance(index, RecordingIndex) else index


class Spaces:
    """Key-space names -> the controller's indexes (the unrecorded ones)."""

    def __init__(self, controller: Any):
        self.c = controller

    def index_for(self, space: str) -> Any:
        c = self.c
        if space == SPACE_OURS:
            return _inner(c.index)
        if space == SPACE_LMCACHE:
            if c.lmcache is None:
                raise ValueError("the log has LMCache workers' operations; serve them (--monitor-ports) here too")
            return _inner(c.lmcache.index)
        if space.startswith(KV_PREFIX):
            if c.kv_events is None:
                raise ValueError("the log has engine-event operations but this controller has no KV-event source")
            return _inner(c.kv_events.namespaces.get(*parse_kv_space(space)).index)
        raise ValueError(f"unknown key space {space!r} in the log")

    def apply(self, message: dict) -> None:
        changed = apply_message(message["ops"], self.index_for)
        if changed and self.c.settings.role == "replica":
            self.refresh_membership(changed)

    def refresh_membership(self, spaces: set[str]) -> None:
        """A replica has no worker records: which key spaces a lookup asks follows from the
        workers each index has registered."""
        c = self.c
        counts = {None: sum(len(w) for w in _inner(c.index).workers().values())}
        if c.lmcache is not None:
            counts[c.lmcache] = sum(len(w) for w in _inner(c.lmcache.index).workers().values())
        c.registry.by_source = counts  # read by lookups on other threads: replaced whole
        kv = c.kv_events
        if kv is None:
            return
        for space in spaces:
            if space.startswith(KV_PREFIX):
                ns = kv.namespaces.get(*parse_kv_space(space))
                ns.engines = set(_inner(ns.index).workers())

    def indexes(self) -> list[tuple[str, Any]]:
        """Every key space and its index (what a snapshot holds)."""
        c = self.c
        out = [(SPACE_OURS, _inner(c.index))]
        if c.lmcache is not None:
            out.append((SPACE_LMCACHE, _inner(c.lmcache.index)))
        if c.kv_events is not None:
            out.extend((kv_space(ns.model, ns.lora_name, ns.cache_salt, ns.block_size), _inner(ns.index))
                       for ns in c.kv_events.namespaces.all())
        return out

    def reset(self) -> None:
        """Empty every key space (before a snapshot is loaded again)."""
        for _, index in self.indexes():
            for instance_id, worker_ids in index.workers().items():
                index.clear(instance_id)
                for worker_id in worker_ids:
                    index.remove_worker(instance_id, worker_id)

    def digests(self) -> dict[str, int]:
        return {space: index.digest() for space, index in self.indexes()}


class IngestRole:
    def __init__(self, controller: Any):
        self.c = controller
        s = controller.settings
        self.publisher = Publisher(s.nats_url, s.ingest_resend_fraction, on_fenced=self._fenced)
        self.spaces = Spaces(controller)
        self._commands: Any = None

    def wrap(self, index: Any, space: str) -> RecordingIndex:
        return RecordingIndex(index, space, self.publisher.record)

    async def start(self) -> None:
        """Connect, rebuild the indexes from the log, then hand back workers to their sources."""
        c = self.c
        await self.publisher.start()
        follower = Follower(c.settings.nats_url, "lmcache-ingest-rebuild", self.spaces.apply)
        try:
            await follower.connect()
            seq, origin = await start_following(follower, self.spaces, None, "ingest")
            if seq:
                log.info("ingest: rebuilding from the %s snapshot at %d", origin, seq)
            # up to our claim: what an ingest we replace published before it is ours now
            target = max(follower.start_target, self.publisher.claim_seq)
            if not await follower.wait_applied(target, CATCH_UP_TIMEOUT):
                raise RuntimeError(f"could not read the log to its end ({follower.broken or 'timed out'})")
        finally:
            await follower.stop()
        if c.kv_events is not None:
            for ns in c.kv_events.namespaces.all():
                ns.engines = set(_inner(ns.index).workers())
        restored = c.registry.restore()
        dropped = 0
        if c.lmcache is not None:
            for instance_id, worker_ids in c.lmcache.index.workers().items():
                for worker_id in worker_ids:
                    dropped += c.lmcache.index.remove_worker(instance_id, worker_id)
        if c.kv_events is not None:
            for ns in c.kv_events.namespaces.all():
                for instance_id, worker_ids in ns.index.workers().items():
                    for worker_id in worker_ids:
                        dropped += ns.index.remove_worker(instance_id, worker_id)
                ns.engines.clear()
        log.info("ingest: rebuilt from the log up to %d: %d of our workers to come back; %d holdings of "
                 "LMCache workers and engines dropped until they report again", follower.applied, restored, dropped)
        self._commands = await self.publisher.nc.subscribe(COMMAND_SUBJECT, queue=COMMAND_QUEUE, cb=self._on_command)

    async def _on_command(self, msg: Any) -> None:
        # one task per command: a command waits for workers, the next must not wait for it
        task = asyncio.get_running_loop().create_task(self._command(msg))
        self.c.ops.tasks.add(task)
        task.add_done_callback(self.c.ops.tasks.discard)

    async def _command(self, msg: Any) -> None:
        """A replica's request: run it as our own HTTP API would, publish what the workers
        reported meanwhile, and answer with the log position that holds it."""
        try:
            req = json.loads(msg.data)
            credential = req.get("credential")
            request = Request(b"POST", req["path"].encode(), b"", req["body"].encode("latin-1"), True,
                              credential.encode("latin-1") if credential is not None else None,
                              f"{req.get('peer', '?')} via a replica")
            result = self.c.api(request)
            if type(result) is not tuple:
                result = await result
            seq = await self.publisher.flushed(self.c.settings.command_timeout)
            reply = {"status": result[0], "body": result[2].decode("latin-1"), "log_seq": seq}
        except Exception as exc:  # a malformed request from a replica, or a failure here
            log.exception("ingest: command from a replica failed")
            reply = {"status": 500, "body": json.dumps({"error": f"the ingest failed: {exc}"}), "log_seq": None}
        await msg.respond(json.dumps(reply).encode())

    def _fenced(self, reason: str) -> None:
        """Another ingest took the log over: nothing this one applies reaches the log any more,
        and its sources must report to the other. Stop taking commands and exit (status 3)."""
        task = asyncio.get_running_loop().create_task(self._stop_commands())
        self.c.ops.tasks.add(task)
        task.add_done_callback(self.c.ops.tasks.discard)
        self.c.request_exit(EXIT_FENCED, "this ingest is fenced")  # the reason is logged

    async def _stop_commands(self) -> None:
        commands, self._commands = self._commands, None
        if commands is not None:
            try:
                await commands.unsubscribe()
            except Exception:  # the connection is already gone
                pass

    async def stop(self) -> None:
        await self._stop_commands()
        await self.publisher.stop()

    def state(self) -> dict:
        fenced = self.publisher.fenced is not None
        return {"status": "fenced" if fenced else "ok", "role": "ingest", "ready": not fenced,
                "workers": len(self.c.registry.workers), **self.publisher.stats()}


class ReplicaRole:
    def __init__(self, controller: Any):
        self.c = controller
        self.spaces = Spaces(controller)
        self.follower = Follower(controller.settings.nats_url, "lmcache-replica", self.spaces.apply)
        self.origin = "none"  # where the index started from: none, local or shared snapshot
        self.snapshot_seq = 0  # sequence of the last local snapshot written
        self.shared: SharedSnapshots | None = None
        self._snapshots: asyncio.Task | None = None
        self._recovery: asyncio.Task | None = None
        self.recovering = False  # loading a snapshot again after our next messages were purged
        self.recoveries = 0
        # (applied seq, digests): computing them costs ~13 ms per 1M keys, and /healthz is
        # polled; the indexes change only with the applied sequence (and the bootstrap)
        self._digests: tuple[int, dict[str, str]] | None = None

    async def start(self) -> None:
        """Load the best snapshot, follow the log from it; snapshot periodically when asked."""
        s = self.c.settings
        f = self.follower
        await f.connect()
        seq = await self._bootstrap()
        log.info("replica: following the log from %d (%s snapshot; ready at %d)", seq + 1, self.origin,
                 f.start_target)
        if s.snapshot:
            self.shared = SharedSnapshots(f.js, f"{socket.gethostname()}:{os.getpid()}", s.snapshot_interval)
            self._snapshots = asyncio.get_running_loop().create_task(self._snapshot_loop())
        self._recovery = asyncio.get_running_loop().create_task(self._recovery_loop())

    async def _bootstrap(self) -> int:
        """Load the best snapshot and follow the log from it; the sequence it reflects."""
        s = self.c.settings
        seq, self.origin = await start_following(self.follower, self.spaces, s.snapshot, "replica")
        if self.origin == "local":
            self.snapshot_seq = seq
        elif s.snapshot:
            # the local snapshot (if any) is not what we loaded (older, or of a stream created
            # again): rewrite it now, so that a snapshot publisher never offers it, even on an
            # idle stream
            self.snapshot_seq = -1
            self.snapshot()
        self._digests = None  # computed during the bootstrap, perhaps
        return seq

    async def _recovery_loop(self) -> None:
        """When the messages after our position are gone (a purge overtook us, the stream was
        created again), load a snapshot again and follow from it, as a new replica would.
        Until then /healthz says ``recovering`` (not ready); while a snapshot loads, lookups
        may miss what the log holds, never report what it does not."""
        delay = RECOVERY_CHECK
        while True:
            await asyncio.sleep(delay)
            f = self.follower
            if f.broken is None or not f.recoverable:
                delay = RECOVERY_CHECK
                continue
            log.warning("replica: %s; loading a snapshot again", f.broken)
            self.recovering = True
            try:
                await f.reset()
                seq = await self._bootstrap()
            except Exception as exc:  # no usable snapshot yet, NATS away: try again later
                f.broken, f.recoverable = f"recovery failed ({exc})", True
                delay = min(RECOVERY_MAX_DELAY, delay * 2)
                log.error("replica: %s; trying again in %.0f s", f.broken, delay)
            else:
                self.recoveries += 1
                delay = RECOVERY_CHECK
                log.warning("replica: recovered from the %s snapshot at %d; following from %d", self.origin, seq,
                            seq + 1)
            finally:
                self.recovering = False

    async def _snapshot_loop(self) -> None:
        assert self.shared is not None
        while True:
            await asyncio.sleep(self.c.settings.snapshot_interval)
            if self.follower.broken is not None or self.recovering:
                # our indexes no longer follow the log: never publish them, let another lead
                await self.shared.release()
                if self.follower.recoverable or self.recovering:
                    continue  # until the recovery loop has loaded a snapshot again
                log.error("replica: following stopped; no more snapshots")
                return
            try:
                self.snapshot()
                if await self.shared.leader():
                    await self.shared.publish(self.c.settings.snapshot)
            except Exception:  # a failed snapshot must never stop following
                log.exception("replica: snapshot failed")

    async def forward(self, request: Request) -> tuple[int, bytes, bytes]:
        """An endpoint that acts on workers: the ingest, which holds their connections, runs
        it; we answer once we have applied the log up to what it published meanwhile."""
        timeout = self.c.settings.command_timeout + 5
        payload = {"path": request.path.decode("latin-1"), "body": request.body.decode("latin-1"),
                   "credential": request.credential.decode("latin-1") if request.credential is not None else None,
                   "peer": request.peer}
        try:
            msg = await self.follower.nc.request(COMMAND_SUBJECT, json.dumps(payload).encode(), timeout=timeout)
            reply = json.loads(msg.data)
        except Exception as exc:  # no ingest, no answer in time, connection lost
            return 503, JSON, error_body(f"the ingest did not answer ({type(exc).__name__}); retry later")
        seq = reply.get("log_seq")
        if seq is None:
            return 503, JSON, error_body("the ingest could not publish the result to the log; retry later")
        if not await self.follower.wait_applied(seq, timeout):
            return 503, JSON, error_body(f"this replica has not applied log message {seq} yet; retry later")
        return reply["status"], JSON, reply["body"].encode("latin-1")

    def snapshot(self) -> None:
        """Write the local snapshot, when the log moved since the last one. Every index is
        dumped without yielding to the loop, so all of them reflect one sequence."""
        seq = self.follower.applied
        if seq == self.snapshot_seq or not self.c.settings.snapshot:
            return
        dump_local(self.c.settings.snapshot, seq, self.spaces.indexes(), self.follower.stream)
        self.snapshot_seq = seq

    async def stop(self) -> None:
        for task in (self._snapshots, self._recovery):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.follower.ready:
            self.snapshot()
        await self.follower.stop()

    def state(self) -> dict:
        f = self.follower
        if self._digests is None or self._digests[0] != f.applied:
            self._digests = (f.applied, {k: str(v) for k, v in self.spaces.digests().items()})
        if self.recovering or (f.broken is not None and f.recoverable):
            status = "recovering"
        else:
            status = "broken" if f.broken is not None else "ok" if f.ready else "catching up"
        return {"status": status, "role": "replica", "ready": f.ready and not self.recovering,
                "recoveries": self.recoveries,
                "applied_seq": f.applied, "start_target": f.start_target, "origin": self.origin,
                "snapshot_seq": self.snapshot_seq, "snapshot_leader": self.shared is not None and
                self.shared.revision is not None, "skipped": f.skipped, "gaps": f.gaps,
                "broken": f.broken, "lag_ms": lag_summary(list(f.lags)),
                "digests": self._digests[1]}


async def start_following(f: Follower, spaces: Spaces, directory: str | None, role: str) -> tuple[int, str]:
    """Load the best snapshot and subscribe from it; tried again when the stream was purged
    (or the shared snapshot replaced) while we loaded. (sequence, origin)"""
    for attempt in range(1, BOOTSTRAP_ATTEMPTS + 1):
        try:
            seq, origin = await bootstrap(f.js, spaces.index_for, directory, spaces.reset)
            if role == "replica":
                spaces.refresh_membership({space for space, _ in spaces.indexes()})
            await f.start(seq)
            return seq, origin
        except Exception as exc:
            if attempt == BOOTSTRAP_ATTEMPTS:
                raise
            log.warning("%s: starting from a snapshot failed (%s); trying again", role, exc)
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


def lag_summary(lags: list[float]) -> dict:
    """p50/p99/max of publish-to-applied times, in ms."""
    if not lags:
        return {"n": 0}
    lags.sort()

    def at(q: float) -> float:
        return round(lags[min(len(lags) - 1, int(q * len(lags)))] * 1000, 2)

    return {"n": len(lags), "p50": at(0.5), "p99": at(0.99), "max": round(lags[-1] * 1000, 2)}
