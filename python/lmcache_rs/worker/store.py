"""KVStore: the KV-cache chunks of one tensor-parallel rank, in its tiers (no network here).

``store(tokens, kv)`` cuts ``kv`` ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` into
chunks of ``chunk_size`` tokens keyed by ``lmcache_rs.chunk_hashes(tokens, chunk_size,
hash_seed)`` and keeps them in the CPU pool (LocalCPUBackend) and, written behind by a
background thread, on disk (LocalDiskBackend); ``reserve``/``commit`` are the same in two
halves, for a caller that copies its KV into the reserved slots itself (one copy, not two).
``retrieve(tokens)`` returns the longest stored prefix bit for bit; ``lookup(tokens)`` only
measures it.

While someone reports (``start_reporting``), every admit and eviction at every location is
recorded in an event log that they read with ``take_events``; nothing here waits on them. The
worker process (worker.py) puts network services around a store; a store is also usable on its
own, embedded in another process. One lock guards the metadata of both tiers; copies of chunk
data run outside it, on slots that are reserved (not yet visible) or held by a reader count
(not evictable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from lmcache_rs import chunk_hashes
from lmcache_rs.config import GB, LMCacheConfig

from . import compression
from .cpu_backend import NAME as CPU
from .cpu_backend import CpuChunk, LocalCPUBackend
from .disk_backend import NAME as DISK
from .disk_backend import DiskChunk, LocalDiskBackend
from .transfer import Copier

log = logging.getLogger("lmcache_rs.worker")

LOCATIONS = (CPU, DISK)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    """The torch floating dtype called ``name``. Raises ValueError otherwise."""
    dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"not a floating-point torch dtype: {name!r}")
    return dtype


def token_list(tokens: Any) -> list[int]:
    """Tokens as a list of ints (list, tuple, array, numpy or CPU/CUDA torch tensor)."""
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().reshape(-1).cpu().tolist()
    if isinstance(tokens, list):
        return tokens
    if hasattr(tokens, "tolist"):
        return list(tokens.tolist())
    return list(tokens)


@dataclass
class ChunkExport:
    """A chunk ready to send to a peer: raw bytes in memory, or a file and its checksum."""

    key: int
    dtype: str
    shape: list[int]
    nbytes: int
    data: Optional[memoryview | bytes] = None
    file: Any = None
    checksum: Optional[int] = None
    disk: Optional[DiskChunk] = None  # index entry of a file export, to drop it if the file is damaged


@dataclass
class PendingStore:
    """Slots reserved by ``KVStore.reserve``, to write and then commit or cancel."""

    keys: list[int]  # the chunk keys of all the tokens
    bounds: list[tuple[int, int]]  # their token ranges
    reserved: list[tuple[int, int, int]]  # (chunk index, key, slot) of the chunks to write
    writes: list[tuple[int, int, torch.Tensor]]  # (begin, end, slot view) of the same chunks


class KVStore:
    """KV-cache chunks of one worker (tensor-parallel rank ``worker_id`` of an instance)."""

    def __init__(self, config: LMCacheConfig, worker_id: int = 0):
        config.validate()
        if worker_id < 0:
            raise ValueError(f"worker_id must be >= 0, got {worker_id}")
        self.config = config
        self.worker_id = worker_id
        self.instance_id = config.lmcache_instance_id
        self.chunk_size = config.chunk_size
        self.seed = config.hash_seed
        self.num_layers, self.num_kv_heads, self.head_dim = config.num_layers, config.num_kv_heads, config.head_dim
        self.dtype = dtype_from_name(config.kv_dtype)
        self._elements_per_token = self.num_layers * 2 * self.num_kv_heads * self.head_dim
        self.slot_bytes = self._elements_per_token * self.chunk_size * self.dtype.itemsize
        self.report_cpu = config.local_cpu
        self._lock = threading.RLock()
        self._pinned: set[int] = set()
        self._held: dict[int, int] = {}  # key -> holds (hold/release): kept from eviction like a pin
        self._events: list[tuple[str, str, list[int]]] = []
        self._reporting = False
        self._waker: Optional[Callable[[], None]] = None
        self._watcher: Optional[Callable[[str, str, list[int]], None]] = None
        self.cpu = LocalCPUBackend(int(config.max_local_cpu_size * GB), self.slot_bytes)
        self.disk: Optional[LocalDiskBackend] = None
        if config.disk_enabled:
            assert config.disk_path is not None
            directory = os.path.join(config.disk_path, _safe_name(f"{self.instance_id}.rank{worker_id}"))
            header = {
                "chunk_size": self.chunk_size,
                "seed": self.seed,
                "shape": [self.num_layers, self.num_kv_heads, self.head_dim],
                "kv_dtype": dtype_name(self.dtype),  # sets the slot size: wider chunks would not fit
            }
            self.disk = LocalDiskBackend(directory, int(config.max_local_disk_size * GB), header)
        self._copier = Copier(self.slot_bytes)
        self._write_queue: queue.Queue[Optional[int]] = queue.Queue()
        self._writer: Optional[threading.Thread] = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish disk writes and free the pool."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._write_queue.put(None)
            self._writer.join()
            self._writer = None
        if self.disk is not None:
            self.disk.close()
        self.cpu.close()

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- keys -----------------------------------------------------------------------------------
    def chunk_keys(self, tokens: Sequence[int]) -> list[int]:
        return chunk_hashes(tokens, self.chunk_size, self.seed)

    def _bounds(self, num_tokens: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.chunk_size, num_tokens)) for s in range(0, num_tokens, self.chunk_size)]

    def chunk_shape(self, ntokens: int) -> tuple[int, int, int, int, int]:
        """The tensor shape of a chunk of ``ntokens`` tokens."""
        return (self.num_layers, 2, ntokens, self.num_kv_heads, self.head_dim)

    def chunk_nbytes(self, ntokens: int, dtype: torch.dtype) -> int:
        """The bytes of a chunk of ``ntokens`` tokens of ``dtype``."""
        return self._elements_per_token * ntokens * dtype.itemsize

    # -- the event log (read by the reporter) ----------------------------------------------------
    def _emit(self, op: str, location: str, keys: list[int]) -> None:
        """Record admits/evictions (lock held). Dropped while nobody reports: the next
        ``start_reporting`` returns the whole state."""
        if keys and self._watcher is not None:
            self._watcher(op, location, keys)
        if not keys or not self._reporting or (location == CPU and not self.report_cpu):
            return
        first = not self._events
        self._events.append((op, location, list(keys)))
        if first and self._waker is not None:
            self._waker()

    def start_reporting(self, waker: Callable[[], None]) -> dict[str, list[int]]:
        """Begin recording events and return what is held now, per location (a full sync).
        ``waker`` is called (from any thread, with the store's lock held: it must only wake
        someone) when the log goes from empty to not empty."""
        with self._lock:
            self._waker = waker
            self._reporting = True
            self._events = []
            return self._holdings()

    def watch(self, watcher: Callable[[str, str, list[int]], None]) -> None:
        """Call ``watcher(op, location, keys)`` on every admit and eviction at every location
        (reported or not, with the store's lock held: it must be quick), after one "admit"
        per location of what is held now. One watcher per store."""
        with self._lock:
            self._watcher = watcher
            watcher("admit", CPU, list(self.cpu.entries))
            if self.disk is not None:
                watcher("admit", DISK, list(self.disk.entries))

    def stop_reporting(self) -> None:
        with self._lock:
            self._reporting = False
            self._events = []

    def has_events(self) -> bool:
        """Whether events wait in the log (a racy peek: ``take_events`` is what counts)."""
        return bool(self._events)

    def take_events(self) -> list[tuple[str, str, list[int]]]:
        """The events recorded since the last call, oldest first: (op, location, keys)."""
        with self._lock:
            events, self._events = self._events, []
            return events

    def _holdings(self) -> dict[str, list[int]]:
        held: dict[str, list[int]] = {}
        if self.report_cpu:
            held[CPU] = list(self.cpu.entries)
        if self.disk is not None:
            held[DISK] = list(self.disk.entries)
        return held

    # -- store ----------------------------------------------------------------------------------
    def store(self, tokens: Any, kv: torch.Tensor, start: int = 0) -> int:
        """Store the KV cache of ``tokens``; returns how many leading tokens are now stored.

        ``kv``: ``[num_layers, 2, len(tokens) - start, num_kv_heads, head_dim]``, CPU or CUDA,
        of the store's ``kv_dtype`` (one dtype per store, so a chunk's key says what it holds). ``start`` (a multiple
        of ``chunk_size``, default 0) lets an engine store only the chunks it just computed:
        ``kv`` then holds tokens ``start..`` and the chunks before are left as they are. Chunks
        already held are kept; new ones go into the CPU pool, evicting least recently used
        unpinned chunks. When the pool cannot take more, only part is stored. The return value
        counts the leading tokens of ``tokens`` held after the call. Raises ValueError on a
        tensor of the wrong shape or dtype, or a ``start`` that is not a chunk boundary within
        the tokens.
        """
        tokens = token_list(tokens)
        self._check_start(tokens, start)
        self._check_kv(kv, len(tokens) - start)
        pending = self.reserve(tokens, start)
        try:
            self._copier.gather(kv, [(begin - start, end - start, view) for begin, end, view in pending.writes])
        except BaseException:
            self.cancel(pending)
            raise
        return self.commit(pending)

    def reserve(self, tokens: Any, start: int = 0) -> "PendingStore":
        """The first half of ``store``, for a caller that writes the KV into the pool itself
        (one copy instead of two): slots for the chunks of ``tokens`` from ``start`` that the
        store does not hold yet. Write each of ``pending.writes`` (tokens ``begin..end`` into a
        ``[num_layers, 2, end - begin, num_kv_heads, head_dim]`` view of the store's
        ``kv_dtype``), then ``commit(pending)``, or ``cancel(pending)`` to write nothing. The
        slots stay invisible to readers until committed. Raises ValueError as ``store``."""
        tokens = token_list(tokens)
        self._check_start(tokens, start)
        keys = self.chunk_keys(tokens) if tokens else []
        bounds = self._bounds(len(tokens))
        first = start // self.chunk_size
        reserved: list[tuple[int, int, int]] = []  # (chunk index, key, slot)
        evicted: list[int] = []
        with self._lock:
            protect = set(keys)
            for i in range(first, len(keys)):
                key = keys[i]
                if key in self.cpu.entries:
                    self.cpu.touch(key)
                    if self.disk is not None:
                        self.disk.touch(key)
                    continue
                slot = self.cpu.reserve(protect, evicted)
                if slot is None:
                    break
                reserved.append((i, key, slot))
            self._after_cpu_evictions(evicted)
        writes = []
        for i, _key, slot in reserved:
            begin, end = bounds[i]
            nbytes = self.chunk_nbytes(end - begin, self.dtype)
            writes.append((begin, end, self.cpu.slot_tensor(slot, nbytes, self.dtype, self.chunk_shape(end - begin))))
        return PendingStore(keys, bounds, reserved, writes)

    def cancel(self, pending: "PendingStore") -> None:
        """Give back the slots of a ``reserve`` whose KV will not be written."""
        with self._lock:
            for _i, _key, slot in pending.reserved:
                self.cpu.release(slot)
        pending.reserved = []

    def commit(self, pending: "PendingStore") -> int:
        """Make the written chunks of a ``reserve`` visible; returns how many leading tokens of
        its tokens are now stored (as ``store``)."""
        admitted: list[int] = []
        with self._lock:
            for i, key, slot in pending.reserved:
                if key in self.cpu.entries:  # stored meanwhile by another thread
                    self.cpu.release(slot)
                    continue
                begin, end = pending.bounds[i]
                chunk = CpuChunk(key, end - begin, self.dtype, self.chunk_nbytes(end - begin, self.dtype), slot=slot)
                self.cpu.commit(chunk, self._kept(key))
                admitted.append(key)
            pending.reserved = []
            self._emit("admit", CPU, admitted)
            self._write_behind(admitted)
            return self._stored_prefix(pending.keys, pending.bounds)

    def _check_start(self, tokens: list[int], start: Any) -> None:
        if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start % self.chunk_size \
                or start > len(tokens):
            raise ValueError(f"start must be a multiple of chunk_size {self.chunk_size} within the "
                             f"{len(tokens)} tokens, got {start!r}")

    def _check_kv(self, kv: torch.Tensor, num_tokens: int) -> None:
        if not isinstance(kv, torch.Tensor):
            raise ValueError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        expected = self.chunk_shape(num_tokens)
        if tuple(kv.shape) != expected:
            raise ValueError(
                f"kv has shape {tuple(kv.shape)}, expected [num_layers, 2, num_tokens, num_kv_heads, head_dim] = {expected}"
            )
        if not kv.dtype.is_floating_point:
            raise ValueError(f"kv must be a floating-point tensor, got {kv.dtype}")
        if kv.dtype != self.dtype:
            # one dtype per store: what the controller is told is held is what retrieve returns
            raise ValueError(
                f"kv dtype {dtype_name(kv.dtype)} is not the store's kv_dtype {dtype_name(self.dtype)}; "
                f"set kv_dtype: {dtype_name(kv.dtype)} in the config (a store holds one dtype)"
            )

    def _check_out(self, out: torch.Tensor, num_tokens: int, device: str | torch.device | None) -> None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
        want = self.chunk_shape(num_tokens)
        shape = tuple(out.shape)
        if len(shape) != 5 or shape[:2] != want[:2] or shape[3:] != want[3:] or shape[2] < num_tokens:
            raise ValueError(
                f"out has shape {shape}, expected [num_layers, 2, T >= {num_tokens}, num_kv_heads, head_dim] "
                f"with {want[:2]} and {want[3:]}"
            )
        if not out.dtype.is_floating_point:
            raise ValueError(f"out must be a floating-point tensor, got {out.dtype}")
        if out.dtype != self.dtype:
            raise ValueError(f"out dtype {dtype_name(out.dtype)} is not the store's kv_dtype {dtype_name(self.dtype)}")
        if device is not None and torch.device(device) != out.device:
            if not (torch.device(device).type == out.device.type and torch.device(device).index is None):
                raise ValueError(f"device {device} differs from out's device {out.device}")

    def _after_cpu_evictions(self, evicted: list[int]) -> None:
        """Events and pin bookkeeping for chunks evicted from the CPU pool (lock held)."""
        self._emit("evict", CPU, evicted)

    def _write_behind(self, keys: list[int]) -> None:
        if self.disk is None or not keys:
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._writer_loop, name="lmcache-disk-writer", daemon=True)
            self._writer.start()
        for key in keys:
            self._write_queue.put(key)

    def flush(self) -> None:
        """Wait until every chunk stored so far has been written behind to disk."""
        if self._writer is not None:
            self._write_queue.join()

    # -- disk writer thread ---------------------------------------------------------------------
    def _writer_loop(self) -> None:
        while True:
            key = self._write_queue.get()
            try:
                if key is None:
                    return
                self._write_one(key)
            except Exception:
                log.exception("disk tier: writing chunk %016x failed", key)
            finally:
                self._write_queue.task_done()

    def _write_one(self, key: int) -> None:
        disk = self.disk
        assert disk is not None
        with self._lock:
            if key in disk.entries or key not in self.cpu.entries:
                return
            chunk = self.cpu.acquire(key)
        try:
            data = self._raw_bytes(chunk)
            checksum = disk.write_file(key, data)
        except BaseException:
            with self._lock:
                self.cpu.release_reader(chunk)
            raise
        with self._lock:
            alive = not chunk.dead
            self.cpu.release_reader(chunk)
            evicted: list[int] = []
            if not alive or key in disk.entries or not disk.make_room(chunk.nbytes, {key}, evicted):
                self._emit("evict", DISK, evicted)
                self._forget_pins(evicted)
                if key not in disk.entries:
                    with contextlib.suppress(OSError):
                        os.unlink(disk.path_of(key))
                return
            disk.commit(
                DiskChunk(key, chunk.ntokens, dtype_name(chunk.dtype), chunk.nbytes, checksum), self._kept(key)
            )
            self._emit("evict", DISK, evicted)
            self._forget_pins(evicted)
            self._emit("admit", DISK, [key])
            if not self.report_cpu and key in self.cpu.entries:
                self.cpu.remove(key)  # the pool was only a staging area
                self._emit("evict", CPU, [key])  # for the watcher: CPU events are not reported here

    def _raw_bytes(self, chunk: CpuChunk) -> memoryview | bytes:
        """The uncompressed bytes of a chunk the caller holds a reader on."""
        if chunk.blob is not None:
            return bytes(compression.decompress(self.cpu.blob_memory(chunk.blob), chunk.nbytes))
        return self.cpu.slot_memory(chunk.slot, chunk.nbytes)

    # -- retrieve -------------------------------------------------------------------------------
    def retrieve(self, tokens: Any, device: str | torch.device | None = None,
                 out: Optional[torch.Tensor] = None) -> tuple[int, torch.Tensor]:
        """The longest stored prefix of ``tokens``: ``(matched_tokens, kv)`` with ``kv`` of shape
        ``[num_layers, 2, matched_tokens, num_kv_heads, head_dim]`` on ``device`` (default CPU),
        bit for bit what was stored. Chunks found only on disk are read back (and kept in the
        CPU pool).

        With ``out`` (shape ``[num_layers, 2, T, num_kv_heads, head_dim]``, ``T >= len(tokens)``,
        any device) the prefix is written into ``out[:, :, :matched_tokens]`` and that view is
        returned; nothing is allocated. Raises ValueError for an ``out`` of another shape or
        dtype than the store's, or a ``device`` other than ``out``'s.
        """
        tokens = token_list(tokens)
        if out is not None:
            self._check_out(out, len(tokens), device)
            device = out.device
        device = torch.device(device if device is not None else "cpu")
        keys = self.chunk_keys(tokens) if tokens else []
        bounds = self._bounds(len(tokens))
        plan: list[tuple[int, Any]] = []  # (chunk index, CpuChunk or (DiskChunk, file))
        with self._lock:
            for i, key in enumerate(keys):
                chunk = self.cpu.entries.get(key)
                if chunk is not None:
                    plan.append((i, self.cpu.acquire(key)))
                    self.cpu.touch(key)
                    if self.disk is not None:
                        self.disk.touch(key)  # a hit is a hit in every tier: the hot prefix stays on disk too
                    continue
                if self.disk is not None and key in self.disk.entries:
                    try:
                        handle = self.disk.open_chunk(key)
                    except OSError:
                        self._drop_disk([key])
                        break
                    self.disk.touch(key)
                    plan.append((i, (self.disk.entries[key], handle)))
                    continue
                break
        dtype = out.dtype if out is not None else None
        temps: dict[int, torch.Tensor] = {}
        try:
            # the dtype of the first chunk (or of out); a chunk of another dtype ends the match
            for n, (_, source) in enumerate(plan):
                chunk_dtype = source.dtype if isinstance(source, CpuChunk) else dtype_from_name(source[0].dtype)
                if dtype is None:
                    dtype = chunk_dtype
                elif chunk_dtype != dtype:
                    self._release_plan(plan[n:])
                    plan = plan[:n]
                    break
            # disk reads first: a damaged file ends the match there
            for n, (i, source) in enumerate(plan):
                if isinstance(source, CpuChunk):
                    continue
                tensor = self._read_disk_chunk(source[0], source[1], set(keys))
                if tensor is None:
                    self._release_plan(plan[n + 1 :])
                    plan = plan[:n]
                    break
                temps[i] = tensor
            matched = bounds[plan[-1][0]][1] if plan else 0
            if out is None:
                out = torch.empty(self.chunk_shape(matched), dtype=dtype or self.dtype, device=device)
            else:
                out = out[:, :, :matched]
            spans = []
            for i, source in plan:
                start, end = bounds[i]
                if i in temps:
                    view = temps[i]
                elif source.blob is not None:
                    raw = compression.decompress(self.cpu.blob_memory(source.blob), source.nbytes)
                    view = torch.frombuffer(raw, dtype=torch.uint8).view(source.dtype).view(self.chunk_shape(end - start))
                else:
                    view = self.cpu.slot_tensor(source.slot, source.nbytes, source.dtype, self.chunk_shape(end - start))
                spans.append((start, end, view))
            self._copier.scatter(out, spans)
            return matched, out
        finally:
            self._release_plan(plan)

    def _release_plan(self, plan: list[tuple[int, Any]]) -> None:
        with self._lock:
            for _i, source in plan:
                if isinstance(source, CpuChunk):
                    self.cpu.release_reader(source)
                else:
                    with contextlib.suppress(OSError):
                        source[1].close()

    def _read_disk_chunk(self, meta: DiskChunk, handle: Any, protect: set[int]) -> Optional[torch.Tensor]:
        """Read a disk chunk into a CPU tensor (a pool slot, kept as a CPU chunk, when one is
        free or evictable). None, and the chunk dropped from disk, when the file is damaged or
        unreadable or the chunk does not fit a slot."""
        shape = self.chunk_shape(meta.ntokens)
        dtype = dtype_from_name(meta.dtype)
        if not self._fits_slot(meta, dtype):
            log.warning("disk tier: chunk %016x (%d bytes of %s) does not fit a pool slot of %d bytes; dropping it",
                        meta.key, meta.nbytes, meta.dtype, self.slot_bytes)
            with contextlib.suppress(OSError):
                handle.close()
            self.drop_disk_chunk(meta)
            return None
        slot = None
        if self.report_cpu:
            evicted: list[int] = []
            with self._lock:
                slot = self.cpu.reserve(protect, evicted)
                self._after_cpu_evictions(evicted)
        if slot is not None:
            memory = self.cpu.slot_memory(slot, meta.nbytes)
        else:
            buffer = bytearray(meta.nbytes)
            memory = memoryview(buffer)
        ok = LocalDiskBackend.read_into(handle, meta, memory)
        if not ok:
            log.warning("disk tier: chunk %016x is damaged; dropping it", meta.key)
            with self._lock:
                if slot is not None:
                    self.cpu.release(slot)
            self.drop_disk_chunk(meta)
            return None
        if slot is None:
            return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)
        with self._lock:
            if meta.key in self.cpu.entries:
                self.cpu.release(slot)
                chunk = self.cpu.entries[meta.key]
                if chunk.blob is None and chunk.dtype == dtype:
                    return self.cpu.slot_tensor(chunk.slot, chunk.nbytes, dtype, shape).clone()
                return torch.frombuffer(bytearray(memory), dtype=torch.uint8).view(dtype).view(shape)
            self.cpu.commit(CpuChunk(meta.key, meta.ntokens, dtype, meta.nbytes, slot=slot), self._kept(meta.key))
            self._emit("admit", CPU, [meta.key])
            # read under a reader count so the slot cannot be reused before the copy out
            tensor = self.cpu.slot_tensor(slot, meta.nbytes, dtype, shape).clone()
        return tensor

    def _fits_slot(self, meta: DiskChunk, dtype: torch.dtype) -> bool:
        """Whether a disk chunk's size matches its shape and fits a pool slot. An index
        written under a wider kv_dtype (or damaged) would otherwise overrun the next slot."""
        return dtype == self.dtype and meta.nbytes == self.chunk_nbytes(meta.ntokens, dtype) \
            and meta.nbytes <= self.slot_bytes

    def drop_disk_chunk(self, meta: DiskChunk) -> None:
        """Drop a disk chunk found damaged, unless it was replaced meanwhile."""
        with self._lock:
            if self.disk is not None and self.disk.entries.get(meta.key) is meta:
                self._drop_disk([meta.key])

    def _drop_disk(self, keys: list[int]) -> None:
        assert self.disk is not None
        dropped = [k for k in keys if k in self.disk.entries]
        for key in dropped:
            self.disk.remove(key)
        self._emit("evict", DISK, dropped)
        self._forget_pins(dropped)

    # -- lookup ---------------------------------------------------------------------------------
    def lookup(self, tokens: Any) -> int:
        """Tokens of the longest stored prefix of ``tokens`` (any location)."""
        tokens = token_list(tokens)
        if not tokens:
            return 0
        keys = self.chunk_keys(tokens)
        with self._lock:
            return self._stored_prefix(keys, self._bounds(len(tokens)))

    def _stored_prefix(self, keys: list[int], bounds: list[tuple[int, int]]) -> int:
        """Tokens of the leading chunks held at any location (lock held)."""
        matched = 0
        for key, (_start, end) in zip(keys, bounds):
            if key in self.cpu.entries or (self.disk is not None and key in self.disk.entries):
                matched = end
            else:
                break
        return matched

    # -- holds: chunks an engine is about to load ----------------------------------------------
    def hold(self, tokens: Any) -> tuple[int, list[int]]:
        """The longest stored prefix of ``tokens`` (as ``lookup``) and its chunk keys, which
        are kept from eviction to make room until ``release(keys)``: an engine that promised
        to load them finds them. Holds count (two holds need two releases); ``clear`` and
        ``evict`` still remove held chunks."""
        tokens = token_list(tokens)
        if not tokens:
            return 0, []
        keys = self.chunk_keys(tokens)
        with self._lock:
            matched = self._stored_prefix(keys, self._bounds(len(tokens)))
            taken = keys[: -(-matched // self.chunk_size)] if matched else []
            for key in taken:
                self._held[key] = self._held.get(key, 0) + 1
                self._set_pinned(key, True)
        return matched, taken

    def release(self, keys: list[int]) -> None:
        """End one hold on each of ``keys`` (from ``hold``)."""
        with self._lock:
            for key in keys:
                count = self._held.get(key, 0) - 1
                if count > 0:
                    self._held[key] = count
                    continue
                self._held.pop(key, None)
                if key not in self._pinned:
                    self._set_pinned(key, False)

    def holds(self, key: int, location: Optional[str] = None) -> bool:
        with self._lock:
            if location in (None, CPU) and key in self.cpu.entries:
                return True
            return location in (None, DISK) and self.disk is not None and key in self.disk.entries

    # -- pin / evict / clear --------------------------------------------------------------------
    def pin(self, tokens: Any, location: Optional[str] = None) -> int:
        """Pin every chunk of ``tokens`` held at ``location`` (None: anywhere): pinned chunks
        are never evicted to make room, in any tier (clear still removes them). Returns the
        number of chunks pinned. Raises ValueError for an unknown location."""
        self.check_location(location)
        keys = self.chunk_keys(token_list(tokens))
        count = 0
        with self._lock:
            for key in keys:
                if not self.holds(key, location):
                    continue
                self._pinned.add(key)
                self._set_pinned(key, True)
                count += 1
        return count

    def unpin(self, tokens: Any, location: Optional[str] = None) -> int:
        """Unpin the chunks of ``tokens`` held at ``location`` (None: anywhere); returns how
        many were pinned. Raises ValueError for an unknown location."""
        self.check_location(location)
        keys = self.chunk_keys(token_list(tokens))
        count = 0
        with self._lock:
            for key in keys:
                if key not in self._pinned or not self.holds(key, location):
                    continue
                self._pinned.discard(key)
                self._set_pinned(key, key in self._held)
                count += 1
        return count

    def _set_pinned(self, key: int, pinned: bool) -> None:
        self.cpu.set_pinned(key, pinned)
        if self.disk is not None:
            self.disk.set_pinned(key, pinned)

    def is_pinned(self, key: int) -> bool:
        return key in self._pinned

    def _kept(self, key: int) -> bool:
        """Whether a chunk is out of the LRU order: pinned or held (lock held)."""
        return key in self._pinned or key in self._held

    def _forget_pins(self, keys: list[int]) -> None:
        for key in keys:
            if key in self._pinned and not self.holds(key):
                self._pinned.discard(key)

    def check_location(self, location: Optional[str]) -> None:
        """Raises ValueError for a location this store does not have (None: any)."""
        if location is not None and location not in LOCATIONS:
            raise ValueError(f"unknown location {location!r}; known: {', '.join(LOCATIONS)}")

    def evict(self, tokens: Any, location: Optional[str] = None) -> int:
        """Remove the unpinned chunks of ``tokens`` at ``location`` (None: everywhere).
        Returns the number of (chunk, location) copies removed."""
        self.check_location(location)
        keys = self.chunk_keys(token_list(tokens))
        with self._lock:
            removed = 0
            if location in (None, CPU):
                gone = [k for k in keys if k in self.cpu.entries and k not in self._pinned]
                for key in gone:
                    self.cpu.remove(key)
                self._emit("evict", CPU, gone)
                removed += len(gone)
            if location in (None, DISK) and self.disk is not None:
                gone = [k for k in keys if k in self.disk.entries and k not in self._pinned]
                self._drop_disk(gone)
                removed += len(gone)
            return removed

    def clear(self, location: Optional[str] = None) -> int:
        """Remove every chunk at ``location`` (None: everywhere), pinned ones included.
        Returns the number of (chunk, location) copies removed."""
        self.check_location(location)
        with self._lock:
            removed = 0
            if location in (None, CPU):
                gone = list(self.cpu.entries)
                for key in gone:
                    self.cpu.remove(key)
                self._emit("evict", CPU, gone)
                removed += len(gone)
            if location in (None, DISK) and self.disk is not None:
                gone = list(self.disk.entries)
                self._drop_disk(gone)
                removed += len(gone)
            self._forget_pins(list(self._pinned))
            return removed

    # -- compression ----------------------------------------------------------------------------
    def compress(self, tokens: Any, method: Optional[str] = None, location: Optional[str] = None) -> dict[str, int]:
        """Compress the CPU chunks of ``tokens`` (see compression.py; lossless). Their pool
        slots are given back; compressed blobs are packed into shared slots. Returns
        ``{"chunks", "bytes_before", "bytes_after"}`` over the compressed chunks of ``tokens``.
        Raises ValueError for an unknown method or a location other than LocalCPUBackend."""
        method = compression.canonical_method(method)
        self._compressible(location)
        keys = self.chunk_keys(token_list(tokens))
        protect = set(keys)
        for key in keys:
            with self._lock:
                chunk = self.cpu.entries.get(key)
                if chunk is None or chunk.blob is not None:
                    continue
                self.cpu.acquire(key)
            try:
                blob = compression.compress(self.cpu.slot_memory(chunk.slot, chunk.nbytes), chunk.dtype.itemsize)
            except BaseException:
                with self._lock:
                    self.cpu.release_reader(chunk)
                raise
            with self._lock:
                if chunk.dead or chunk.readers > 1 or len(blob) >= chunk.nbytes:
                    self.cpu.release_reader(chunk)
                    continue
                self.cpu.release_reader(chunk)  # ours was the only reader: the raw slot may go
                evicted: list[int] = []
                self.cpu.replace_with_blob(chunk, blob, method, protect, evicted)
                self._after_cpu_evictions(evicted)
        return self._compression_summary(keys, compressed=True)

    def decompress(self, tokens: Any, method: Optional[str] = None, location: Optional[str] = None) -> dict[str, int]:
        """Undo compress() for the chunks of ``tokens``: each gets a full slot again.
        Returns ``{"chunks", "bytes_before", "bytes_after"}`` over the chunks decompressed."""
        if method is not None:
            compression.canonical_method(method)
        self._compressible(location)
        keys = self.chunk_keys(token_list(tokens))
        protect = set(keys)
        chunks = before = after = 0
        for key in keys:
            with self._lock:
                chunk = self.cpu.entries.get(key)
                if chunk is None or chunk.blob is None:
                    continue
                evicted: list[int] = []
                slot = self.cpu.reserve(protect, evicted)
                self._after_cpu_evictions(evicted)
                if slot is None:
                    break
                self.cpu.acquire(key)
            try:
                compression.decompress_into(self.cpu.blob_memory(chunk.blob), self.cpu.slot_memory(slot, chunk.nbytes))
            except BaseException:
                with self._lock:
                    self.cpu.release(slot)
                    self.cpu.release_reader(chunk)
                raise
            with self._lock:
                if chunk.dead or chunk.readers > 1:
                    self.cpu.release(slot)
                    self.cpu.release_reader(chunk)
                    continue
                self.cpu.release_reader(chunk)
                before += chunk.stored_bytes
                self.cpu.replace_blob_with_slot(chunk, slot)
                after += chunk.nbytes
                chunks += 1
        return {"chunks": chunks, "bytes_before": before, "bytes_after": after}

    def _compressible(self, location: Optional[str]) -> None:
        self.check_location(location)
        if location == DISK:
            raise ValueError("compression applies to LocalCPUBackend only; disk chunks are stored raw")

    def _compression_summary(self, keys: list[int], compressed: bool) -> dict[str, int]:
        with self._lock:
            chosen = [self.cpu.entries[k] for k in keys if k in self.cpu.entries and self.cpu.entries[k].blob is not None]
            return {
                "chunks": len(chosen),
                "bytes_before": sum(c.nbytes for c in chosen),
                "bytes_after": sum(c.stored_bytes for c in chosen),
            }

    # -- export / import for P2P ----------------------------------------------------------------
    @contextlib.contextmanager
    def export_chunk(self, key: int) -> Iterator[Optional[ChunkExport]]:
        """The chunk ``key`` for sending, held so it stays valid until the block ends; None if
        not held. CPU chunks are sent from pool memory; disk-only chunks from their file."""
        with self._lock:
            chunk = self.cpu.entries.get(key)
            if chunk is not None:
                self.cpu.acquire(key)
                meta = None
            elif self.disk is not None and key in self.disk.entries:
                meta = self.disk.entries[key]
                try:
                    handle = self.disk.open_chunk(key)
                except OSError:
                    self._drop_disk([key])
                    meta = None
                    handle = None
            else:
                meta = None
        if chunk is not None:
            try:
                data = self._raw_bytes(chunk)
                yield ChunkExport(key, dtype_name(chunk.dtype), list(self.chunk_shape(chunk.ntokens)), chunk.nbytes, data=data)
            finally:
                with self._lock:
                    self.cpu.release_reader(chunk)
        elif meta is not None:
            try:
                yield ChunkExport(
                    key, meta.dtype, list(self.chunk_shape(meta.ntokens)), meta.nbytes, file=handle,
                    checksum=meta.checksum, disk=meta,
                )
            finally:
                handle.close()
        else:
            yield None

    def expected_chunks(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """(key, ntokens) of every chunk of ``tokens``."""
        keys = self.chunk_keys(tokens)
        return [(k, e - s) for k, (s, e) in zip(keys, self._bounds(len(tokens)))]

    def reserve_free_slots(self, count: int) -> list[int]:
        """Up to ``count`` pool slots that are free now, evicting nothing (give them back with
        ``release_slots``)."""
        with self._lock:
            return self.cpu.reserve_free(count)

    def slot_memory(self, slot: int, nbytes: int) -> memoryview:
        """The first ``nbytes`` of a reserved slot, to read into."""
        return self.cpu.slot_memory(slot, nbytes)

    def reserve_slots(self, count: int, protect: set[int]) -> Optional[list[int]]:
        """``count`` pool slots for an incoming transfer, or None (nothing reserved)."""
        slots: list[int] = []
        evicted: list[int] = []
        with self._lock:
            for _ in range(count):
                slot = self.cpu.reserve(protect, evicted)
                if slot is None:
                    for s in slots:
                        self.cpu.release(s)
                    self._after_cpu_evictions(evicted)
                    return None
                slots.append(slot)
            self._after_cpu_evictions(evicted)
        return slots

    def ensure_on_disk(self, keys: list[int]) -> None:
        """Queue the CPU chunks among ``keys`` that are not on disk yet for writing."""
        if self.disk is None:
            raise ValueError("this worker has no disk tier (local_disk / max_local_disk_size)")
        with self._lock:
            self._write_behind([k for k in keys if k in self.cpu.entries and k not in self.disk.entries])

    def release_slots(self, slots: list[int]) -> None:
        with self._lock:
            for slot in slots:
                self.cpu.release(slot)

    def commit_received(self, received: list[tuple[int, int, torch.dtype, int]], location: str) -> int:
        """Make chunks received into reserved slots visible: (key, ntokens, dtype, slot).
        With location LocalDiskBackend they are also written to disk before this returns.
        Returns the number of chunks newly stored."""
        self.check_location(location)
        if location == DISK and self.disk is None:
            raise ValueError("this worker has no disk tier (local_disk / max_local_disk_size)")
        admitted: list[int] = []
        with self._lock:
            for key, ntokens, dtype, slot in received:
                if key in self.cpu.entries:
                    self.cpu.release(slot)
                    continue
                self.cpu.commit(CpuChunk(key, ntokens, dtype, self.chunk_nbytes(ntokens, dtype), slot=slot), self._kept(key))
                admitted.append(key)
            self._emit("admit", CPU, admitted)
            self._write_behind(admitted)
        if location == DISK:
            self.flush()
        return len(admitted)

    # -- reports --------------------------------------------------------------------------------
    def location_stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            stats = {}
            if self.report_cpu:
                stats[CPU] = {
                    "chunks": len(self.cpu.entries),
                    "bytes": self.cpu.used_bytes,
                    "capacity": self.cpu.capacity,
                }
            if self.disk is not None:
                stats[DISK] = {"chunks": len(self.disk.entries), "bytes": self.disk.used_bytes, "capacity": self.disk.capacity}
            return stats

    def health(self) -> dict[str, Any]:
        with self._lock:
            keys = set(self.cpu.entries)
            if self.disk is not None:
                keys |= set(self.disk.entries)
            return {
                "ok": not self._closed,
                "chunks": len(keys),
                "locations": {loc: s["chunks"] for loc, s in self.location_stats().items()},
            }

    def info(self) -> dict[str, Any]:
        """What this store is and holds (the worker adds its addresses)."""
        return {
            "instance_id": self.instance_id,
            "worker_id": self.worker_id,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "pool": {"slots": self.cpu.num_slots, "slot_bytes": self.slot_bytes, "pinned": self.cpu.pinned_how},
            "locations": self.location_stats(),
        }

    def check(self) -> None:
        """Internal consistency of the tiers (used by tests)."""
        with self._lock:
            self.cpu.check()
            assert self._pinned <= (set(self.cpu.entries) | (set(self.disk.entries) if self.disk else set()))
            for tier in (self.cpu, self.disk):
                if tier is not None:  # the LRU order is exactly the chunks neither pinned nor held
                    assert set(tier.lru) == {k for k in tier.entries if not self._kept(k)}


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)
