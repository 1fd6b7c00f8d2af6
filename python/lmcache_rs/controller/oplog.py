"""Index mutations as normalized operations: what an ingest records and a replica applies.

Every change a source makes to an index is one of

    ("admit" | "evict", instance_id, worker_id, location, keys)   as Index.apply_batch takes it
    ("drop", instance_id, worker_id, location | None, b"")        as Index.apply_batch takes it
    ("register", instance_id, worker_id, None, None)              Index.register_worker
    ("remove_worker", instance_id, worker_id, None, None)         Index.remove_worker

on one key space, named by a string: ``rs`` (our workers), ``lmcache`` (LMCache workers) or
``kv:<model>|<lora>|<salt>|<block size>`` (an engine-event namespace; see ``kv_space``).

In single mode the controller writes to its indexes directly; nothing here is used. An ingest
wraps each index in a :class:`RecordingIndex`, which applies as before and hands the same
operation to a sink. Every operation sets the presence of a (holder, chunk) pair, or all of a
holder's pairs, to a fixed value, so re-applying a suffix of the log converges.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

SPACE_OURS = "rs"
SPACE_LMCACHE = "lmcache"
KV_PREFIX = "kv:"

Op = list  # [op, instance_id, worker_id, location, keys]
Sink = Callable[[str, Op], None]


def kv_space(model: str, lora_name: str | None, cache_salt: str | None, block_size: int) -> str:
    return KV_PREFIX + json.dumps([model, lora_name, cache_salt, block_size], separators=(",", ":"))


def parse_kv_space(space: str) -> tuple[str, str | None, str | None, int]:
    model, lora_name, cache_salt, block_size = json.loads(space[len(KV_PREFIX):])
    return model, lora_name, cache_salt, int(block_size)


def _keys(keys: Any) -> Any:
    """Keys as msgpack carries them: bytes of u64 LE, or a list of ints."""
    if keys is None or isinstance(keys, (bytes, list)):
        return keys
    if isinstance(keys, (bytearray, memoryview)):
        return bytes(keys)
    tobytes = getattr(keys, "tobytes", None)  # array.array('Q'), numpy
    return tobytes() if tobytes is not None else list(keys)


class RecordingIndex:
    """An Index whose mutations are also handed to ``sink(space, op)``, after they applied.

    Reads go to the wrapped index unchanged. A batch the index refuses raises before anything
    is recorded, so the log holds only what was applied."""

    def __init__(self, inner: Any, space: str, sink: Sink):
        self.inner = inner
        self.space = space
        self.sink = sink

    def apply_batch(self, events: Iterable[tuple]) -> Any:
        events = list(events)
        result = self.inner.apply_batch(events)
        sink, space = self.sink, self.space
        for op, instance_id, worker_id, location, keys in events:
            sink(space, [op, instance_id, worker_id, location, None if op == "drop" else _keys(keys)])
        return result

    def register_worker(self, instance_id: str, worker_id: int) -> Any:
        result = self.inner.register_worker(instance_id, worker_id)
        self.sink(self.space, ["register", instance_id, worker_id, None, None])
        return result

    def remove_worker(self, instance_id: str, worker_id: int) -> Any:
        result = self.inner.remove_worker(instance_id, worker_id)
        self.sink(self.space, ["remove_worker", instance_id, worker_id, None, None])
        return result

    def admit(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a recorded index takes apply_batch only")

    # writes applied behind would skip the sink: a recorded index writes directly
    evict = clear = load = start_write_behind = apply_batch_later = settle = admit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)


def apply_ops(index: Any, ops: Iterable[Op]) -> None:
    """Apply one space's operations in order: runs of admit/evict/drop as one apply_batch."""
    run: list[tuple] = []
    for op in ops:
        kind = op[0]
        if kind == "register" or kind == "remove_worker":
            if run:
                index.apply_batch(run)
                run = []
            if kind == "register":
                index.register_worker(op[1], op[2])
            else:
                index.remove_worker(op[1], op[2])
        else:
            run.append((kind, op[1], op[2], op[3], b"" if op[4] is None else op[4]))
    if run:
        index.apply_batch(run)


def apply_message(ops: Iterable[list], index_for: Callable[[str], Any]) -> set[str]:
    """Apply one log message's ``[space, op, ...]`` list in order, each run of one space with
    ``apply_ops``. Returns the spaces whose workers changed (register/remove_worker)."""
    membership: set[str] = set()
    space: str | None = None
    run: list[Op] = []
    for item in ops:
        if item[0] != space:
            if run:
                apply_ops(index_for(space), run)  # type: ignore[arg-type]
            space, run = item[0], []
        run.append(item[1:])
        if item[1] == "register" or item[1] == "remove_worker":
            membership.add(item[0])
    if run:
        apply_ops(index_for(space), run)  # type: ignore[arg-type]
    return membership
