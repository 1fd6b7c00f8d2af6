"""Orchestration: LMCache's management endpoints carried out by the workers.

Each operation sends ``command`` frames (docs/protocol.md, "Command connection") to the
workers of an instance over a :class:`~lmcache_rs.wire.Session` that the controller opens
to ``host:worker_port`` on first use and reopens after a failure. Operations that take
time (move) run in the background under an event id that ``/check_finish`` reports on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
from typing import Any

from ..wire import RemoteError, SessionError, connect, unpack_u32s
from ..wire.session import BAD_ARGS
from .registry import Registry, WorkerRecord

log = logging.getLogger("lmcache_rs.controller.ops")

RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
NOT_FOUND = "not_found"


class OperationError(Exception):
    """An operation that cannot be carried out; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class EventIds:
    """Unique event ids: a kind, a per-process random tag and a counter."""

    def __init__(self) -> None:
        self.tag = os.urandom(4).hex()
        self._counter = itertools.count(1)

    def new(self, kind: str) -> str:
        return f"{kind}-{self.tag}-{next(self._counter)}"


class EventTracker:
    """Status of asynchronous operations by event id, keeping the last ``history`` finished ones."""

    def __init__(self, history: int):
        self.history = history
        self.status: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self._finished: collections.deque[str] = collections.deque()

    def start(self, event_id: str) -> None:
        self.status[event_id] = RUNNING

    def finish(self, event_id: str, error: str | None = None) -> None:
        self.status[event_id] = FAILED if error else COMPLETED
        if error:
            self.errors[event_id] = error
        self._finished.append(event_id)
        while len(self._finished) > self.history:
            old = self._finished.popleft()
            self.status.pop(old, None)
            self.errors.pop(old, None)

    def get(self, event_id: str) -> str:
        return self.status.get(event_id, NOT_FOUND)


class Operations:
    def __init__(self, registry: Registry, chunk_size: int, command_timeout: float, events: EventTracker,
                 api_key: str | None = None):
        self.api_key = api_key  # proven on each command connection (our workers ask for it when they have one)
        self.registry = registry
        self.chunk_size = chunk_size
        self.command_timeout = command_timeout
        self.events = events
        self.tasks: set[asyncio.Task] = set()
        self._connecting: dict[tuple[str, int], asyncio.Task] = {}

    # -- command connections ---------------------------------------------------------------
    async def session(self, record: WorkerRecord):
        command = record.command
        if command is not None and not command.closed:
            return command
        key = record.key
        if not record.worker_port:
            raise SessionError(f"worker {key[0]}/{key[1]} has not reconnected since the controller restarted")
        # One connect per worker, in a task of its own that every caller waits on: a caller
        # that is cancelled (its HTTP client hung up) leaves it running for the others, and it
        # ends with a session or an error for all of them.
        task = self._connecting.get(key)
        if task is None:
            task = self._connecting[key] = asyncio.ensure_future(self._open(record))
            self.tasks.add(task)
            task.add_done_callback(self._connected)
        return await asyncio.shield(task)

    async def _open(self, record: WorkerRecord):
        key = record.key
        session = await connect(record.host, record.worker_port, connect_timeout=min(5.0, self.command_timeout),
                                request_timeout=self.command_timeout, name=f"{key[0]}/{key[1]}", api_key=self.api_key)
        if self.registry.workers.get(key) is not record:
            session.close()  # removed while connecting
            raise SessionError(f"worker {key[0]}/{key[1]} went away")
        record.command = session
        return session

    def _connected(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        for key, pending in list(self._connecting.items()):
            if pending is task:
                del self._connecting[key]
        if not task.cancelled():
            task.exception()  # seen here, so an error nobody awaited any more is not reported as lost

    async def call(self, record: WorkerRecord, op: str, args: dict | None = None) -> Any:
        """One command to one worker. Raises SessionError, OSError or TimeoutError on failure."""
        if record.source is not None:  # a worker of another protocol: its source carries the command
            return await record.source.call(record, op, args or {})
        session = await self.session(record)
        return await session.call(op, args or {})

    async def call_all(self, records: list[WorkerRecord], op: str, args: dict | None = None) -> list[Any]:
        """The same command to several workers at once; raises OperationError (502) naming the failures."""
        results = await asyncio.gather(*(self.call(r, op, args) for r in records), return_exceptions=True)
        failed = [(r, x) for r, x in zip(records, results) if isinstance(x, BaseException)]
        if failed:
            # refused arguments (an unknown location or method) are the request's fault: 400
            bad_request = all(isinstance(x, RemoteError) and x.code == BAD_ARGS for _, x in failed)
            raise OperationError(400 if bad_request else 502, f"{op} failed on " + "; ".join(
                f"{r.instance_id}/{r.worker_id}: {_describe(x)}" for r, x in failed))
        return results

    def workers_of(self, instance_id: str) -> list[WorkerRecord]:
        records = self.registry.instance_workers(instance_id)
        if not records:
            raise OperationError(404, f"unknown instance {instance_id!r}")
        return records

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- operations ------------------------------------------------------------------------
    async def clear(self, instance_id: str, location: str | None) -> int:
        records = self.workers_of(instance_id)
        results = await self.call_all(records, "clear", {"location": location})
        chunks = max((_count(r, "cleared") for r in results), default=0)
        # Each worker reports its evictions in order with everything else it reports, and says
        # in which frame (seq). Waiting for those frames makes the clear visible when this
        # returns; clearing the index here instead would also wipe chunks a worker stored after
        # its clear and reported before its reply came. A worker whose frame does not arrive (or
        # that names none: it is not reporting now, and its next full sync sets its holdings) is
        # cleared here.
        unconfirmed = []
        for record, result in zip(records, results):
            seq = result.get("seq") if isinstance(result, dict) else None
            if type(seq) is not int or not await self.registry.reached(record, seq, self.command_timeout):
                unconfirmed.append(("drop", record.instance_id, record.worker_id, location, b""))
        if unconfirmed:
            self.registry.flush()
            self.registry.index_of(records[0]).apply_batch(unconfirmed)
            self.registry.changes += 1
        return chunks * self.chunk_size

    async def per_token_op(self, instance_id: str, op: str, args: dict, num_tokens: int) -> int:
        records = self.workers_of(instance_id)
        results = await self.call_all(records, op, args)
        chunks = min((_count(r, "chunks") for r in results), default=0)
        return min(chunks * self.chunk_size, num_tokens)

    async def health(self, instance_id: str) -> dict[str, int]:
        records = self.workers_of(instance_id)
        results = await asyncio.gather(*(self.call(r, "health") for r in records), return_exceptions=True)
        codes = {}
        for record, result in zip(records, results):
            ok = isinstance(result, dict) and result.get("ok") is True
            codes[str(record.worker_id)] = 0 if ok else -1
            if not ok:
                log.warning("health of %s/%d: %s", record.instance_id, record.worker_id, _describe(result))
        return codes

    async def worker_info(self, instance_id: str, worker_ids: list[int] | None, missing_ok: bool = False) -> list[dict]:
        """Each worker's registration and what it holds; ``worker_ids`` picks some (unknown ones
        are a 404 unless ``missing_ok``)."""
        records = self.workers_of(instance_id)
        if worker_ids is not None:
            wanted = set(worker_ids)
            missing = wanted - {r.worker_id for r in records}
            if missing and not missing_ok:
                raise OperationError(404, f"instance {instance_id!r} has no worker {sorted(missing)}")
            records = [r for r in records if r.worker_id in wanted]
        results = await asyncio.gather(*(self.call(r, "info") for r in records), return_exceptions=True)
        infos = []
        for record, result in zip(records, results):
            info = {
                "instance_id": record.instance_id,
                "worker_id": record.worker_id,
                "ip": record.host,
                "port": record.worker_port,
                "distributed_url": f"{record.p2p_host}:{record.p2p_port}",
                "registration_time": record.registered_at,
                "last_heartbeat_time": record.last_seen_wall,
            }
            locations = result.get("locations") if isinstance(result, dict) else None
            if _is_location_counts(locations):
                info["locations"] = locations
            elif isinstance(result, BaseException):
                info["error"] = _describe(result)
            else:  # goes into JSON as it is, so nothing else may pass
                info["error"] = "malformed info reply: locations must map names to {field: count}"

            infos.append(info)
        return infos

    def start_move(self, event_id: str, source: tuple[str, str], target: tuple[str, str], tokens: bytes,
                   copy: bool) -> None:
        """Check the move can start, then run it in the background under ``event_id``."""
        src_records = self.workers_of(source[0])
        dst_records = self.workers_of(target[0])
        if len(src_records) != len(dst_records):
            raise OperationError(
                400, f"cannot move between {source[0]!r} ({len(src_records)} tensor-parallel workers) and "
                f"{target[0]!r} ({len(dst_records)})")
        if source == target:
            raise OperationError(400, "old_position and new_position are the same")
        self.events.start(event_id)
        self.spawn(self._move(event_id, src_records, dst_records, source[1], target[1], tokens, copy))

    async def _move(self, event_id: str, src: list[WorkerRecord], dst: list[WorkerRecord], src_loc: str,
                    dst_loc: str, tokens: bytes, copy: bool) -> None:
        try:
            if src[0].source is not None or dst[0].source is not None:
                await self._move_by_source(src, dst, src_loc, dst_loc, tokens, copy)
                log.info("move %s completed", event_id)
                self.events.finish(event_id)
                return
            fetches = await asyncio.gather(
                *(self.call(d, "fetch", {"tokens": tokens, "source": [s.p2p_host, s.p2p_port], "location": dst_loc})
                  for s, d in zip(src, dst)),
                return_exceptions=True,
            )
            failures = [f"{d.instance_id}/{d.worker_id}: {_describe(x)}" for d, x in zip(dst, fetches)
                        if isinstance(x, BaseException)]
            if failures:
                raise OperationError(502, "fetch failed on " + "; ".join(failures))
            if not copy:
                await self.call_all(src, "evict", {"tokens": tokens, "location": src_loc})
        except asyncio.CancelledError:
            self.events.finish(event_id, "cancelled")
            raise
        except Exception as exc:
            log.warning("move %s failed: %s", event_id, _describe(exc))
            self.events.finish(event_id, _describe(exc))
        else:
            log.info("move %s completed", event_id)
            self.events.finish(event_id)


    async def _move_by_source(self, src: list[WorkerRecord], dst: list[WorkerRecord], src_loc: str, dst_loc: str,
                              tokens: bytes, copy: bool) -> None:
        """A move between workers of another protocol: their source pushes from each source
        rank to the destination rank at the same position (LMCache's pairing)."""
        source = src[0].source
        if source is None or any(r.source is not source for r in src + dst):
            raise OperationError(400, "cannot move between workers of different protocols")
        token_list = unpack_u32s(tokens).tolist()
        results = await asyncio.gather(*(source.move(s, d, src_loc, dst_loc, token_list, copy)
                                         for s, d in zip(src, dst)), return_exceptions=True)
        failures = [f"{s.instance_id}/{s.worker_id}: {_describe(x)}" for s, x in zip(src, results)
                    if isinstance(x, BaseException)]
        if failures:
            raise OperationError(502, "move failed on " + "; ".join(failures))


def _count(result: Any, field: str) -> int:
    if isinstance(result, dict):
        value = result.get(field)
        if type(value) is int and value >= 0:
            return value
    raise OperationError(502, f"worker replied without an integer {field!r}: {result!r:.200}")


def _is_location_counts(value: Any) -> bool:
    """``{location: {"chunks": n, "bytes": n, "capacity": n, ...}}``, names str, counts int."""
    return isinstance(value, dict) and all(
        type(location) is str and isinstance(stats, dict)
        and all(type(k) is str and type(n) is int for k, n in stats.items())
        for location, stats in value.items()
    )


def _describe(exc: Any) -> str:
    if isinstance(exc, RemoteError):
        return exc.error
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no reply in time ({type(exc).__name__})"
    if isinstance(exc, BaseException):
        text = str(exc)
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return repr(exc)
