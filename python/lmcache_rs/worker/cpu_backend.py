"""LocalCPUBackend: one CPU memory pool of fixed-size slots, allocated once.

The pool is a single uint8 tensor of ``num_slots * slot_bytes`` bytes, where a slot holds one
full chunk (``num_layers * 2 * chunk_size * num_kv_heads * head_dim`` elements of the
configured ``kv_dtype``). Storing a chunk takes a free slot or evicts the least recently used
unpinned chunk; nothing is allocated per chunk.

Pinned memory: when CUDA is available the pool is page-locked once at start
(``cudaHostRegister`` of the whole pool, falling back to ``pin_memory=True``), so copies to
and from the GPU are asynchronous DMA. Without CUDA it is plain memory: pinning needs the
driver, and nothing would use it.

Compressed chunks (see compression.py) give their slot back and live as blobs packed
back to back into "arena" slots of the same pool (a blob may run on from one arena slot into
the next); an arena slot returns to the free list when its last blob piece is gone.
Compression therefore frees pool memory for real, in proportion to the compression ratio.

Locking: every method here is called with the store's lock held (store.py); the copies
into and out of slots happen outside the lock on slots that are reserved or have readers.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .lru import LruEntries

log = logging.getLogger("lmcache_rs.worker")

Blob = tuple[tuple[int, int, int], ...]  # pieces of a compressed chunk: (slot, offset, length)

NAME = "LocalCPUBackend"
# madvise(2) advice that faults a range in, writable, at once (Linux 5.14+).
MADV_POPULATE_WRITE = 23
PAGE = 4096


@dataclass(eq=False)
class CpuChunk:
    key: int
    ntokens: int
    dtype: torch.dtype
    nbytes: int  # bytes of the uncompressed chunk
    slot: int = -1  # pool slot of the raw bytes, -1 when compressed
    blob: Optional["Blob"] = None  # pieces (arena slot, offset, length) when compressed
    method: Optional[str] = None  # compression method of the blob
    readers: int = 0  # copies in progress that read this chunk's memory
    dead: bool = False  # removed while read; memory returns when the last reader leaves

    @property
    def stored_bytes(self) -> int:
        return sum(p[2] for p in self.blob) if self.blob is not None else self.nbytes


class LocalCPUBackend(LruEntries[CpuChunk]):
    name = NAME

    def __init__(self, capacity_bytes: int, slot_bytes: int, pin: Optional[bool] = None):
        super().__init__()
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        if self.num_slots < 1:
            raise ValueError(f"a pool of {capacity_bytes} bytes holds no slot of {slot_bytes} bytes")
        self.capacity = self.num_slots * slot_bytes
        if pin is None:
            pin = torch.cuda.is_available()
        self.buffer, self.pinned_how = _allocate(self.capacity, pin)
        self.array = self.buffer.numpy()  # same memory, for sockets and files
        self.free: list[int] = list(range(self.num_slots - 1, -1, -1))
        self.slot_refs: dict[int, int] = {}
        self.arena_slot: Optional[int] = None
        self.arena_off = 0

    def populate(self) -> bool:
        """Make the whole pool resident now, rather than one page fault per 4 KiB page the
        first time each slot is written (a few hundred microseconds per megabyte stored, paid
        by whoever stores). Whether the pool is resident: a pinned pool already is; False
        where the kernel cannot (pages then fault in on first use, as before)."""
        if self.pinned_how != "plain":
            return True
        if not sys.platform.startswith("linux"):
            return False
        start = -(-self.buffer.data_ptr() // PAGE) * PAGE
        end = (self.buffer.data_ptr() + self.capacity) // PAGE * PAGE
        try:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
            madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            return end <= start or madvise(start, end - start, MADV_POPULATE_WRITE) == 0
        except (OSError, AttributeError):
            return False

    def close(self) -> None:
        if self.pinned_how == "registered":
            try:
                torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            except Exception:  # pragma: no cover - best effort at exit
                pass
            self.pinned_how = "plain"

    # -- views --------------------------------------------------------------------------------
    def slot_tensor(self, slot: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        start = slot * self.slot_bytes
        return self.buffer[start : start + nbytes].view(dtype).view(shape)

    def slot_memory(self, slot: int, nbytes: int) -> memoryview:
        start = slot * self.slot_bytes
        return memoryview(self.array[start : start + nbytes])

    # -- accounting ---------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.entries.values())

    @property
    def free_slots(self) -> int:
        return len(self.free)

    # -- slots --------------------------------------------------------------------------------
    def reserve(self, protect: Iterable[int] | set, evicted: list[int]) -> Optional[int]:
        """A free slot, evicting LRU chunks (not in ``protect``, not being read) if needed.

        Keys evicted are appended to ``evicted``. None when nothing more can be evicted.
        """
        while not self.free:
            victim = self._pick_victim(protect)
            if victim is None:
                return None
            self.remove(victim)
            evicted.append(victim)
        return self.free.pop()

    def reserve_free(self, count: int) -> list[int]:
        """Up to ``count`` free slots, reserved without evicting anything."""
        taken = self.free[len(self.free) - min(count, len(self.free)):]
        del self.free[len(self.free) - len(taken):]
        return taken

    def release(self, slot: int) -> None:
        """Give back a slot reserved with reserve() and never committed."""
        self.free.append(slot)

    def _pick_victim(self, protect) -> Optional[int]:
        for key in self.lru:
            if key in protect:
                continue
            if self.entries[key].readers:
                continue
            return key
        return None

    # -- entries ------------------------------------------------------------------------------
    def commit(self, chunk: CpuChunk, pinned: bool) -> None:
        self.entries[chunk.key] = chunk
        if not pinned:
            self.lru[chunk.key] = None

    def remove(self, key: int) -> CpuChunk:
        chunk = self.entries.pop(key)
        self.lru.pop(key, None)
        if chunk.readers:
            chunk.dead = True
        else:
            self._free_memory(chunk)
        return chunk

    def acquire(self, key: int) -> CpuChunk:
        chunk = self.entries[key]
        chunk.readers += 1
        return chunk

    def release_reader(self, chunk: CpuChunk) -> None:
        chunk.readers -= 1
        if chunk.dead and chunk.readers == 0:
            self._free_memory(chunk)

    def _free_memory(self, chunk: CpuChunk) -> None:
        if chunk.blob is not None:
            self._drop_blob(chunk.blob)
            chunk.blob = None
        elif chunk.slot >= 0:
            self.free.append(chunk.slot)
        chunk.slot = -1

    # -- compressed blobs ---------------------------------------------------------------------
    def place_blob(self, length: int, protect, evicted: list[int]) -> Optional[Blob]:
        """Room for ``length`` bytes in arena slots: the blob continues from where the last
        one ended and runs on into a new slot when the current one is full. None (nothing
        placed) when no slot can be had."""
        pieces: list[tuple[int, int, int]] = []
        remaining = length
        while remaining:
            if self.arena_slot is None or self.arena_off >= self.slot_bytes:
                slot = self.reserve(protect, evicted)
                if slot is None:
                    for piece in pieces:
                        self._unref(piece[0])
                    return None
                self._close_arena()
                self.arena_slot, self.arena_off = slot, 0
                self.slot_refs[slot] = 0
            take = min(remaining, self.slot_bytes - self.arena_off)
            pieces.append((self.arena_slot, self.arena_off, take))
            self.slot_refs[self.arena_slot] += 1
            self.arena_off += take
            remaining -= take
        self.arena_off = (self.arena_off + 63) & ~63  # next blob 64-byte aligned
        return tuple(pieces)

    def replace_with_blob(self, chunk: CpuChunk, data: bytes, method: str, protect, evicted: list[int]) -> bool:
        """Store a raw chunk (no readers) as the compressed blob ``data`` and give its slot
        back. The slot is freed first, so placing the blob never evicts another chunk.
        False, the chunk left raw in its slot, when the blob finds no room."""
        slot = chunk.slot
        self.free.append(slot)
        place = self.place_blob(len(data), protect, evicted)
        if place is None:
            # nothing was written to the slot (all under the worker's lock): take it back as is
            self.free.remove(slot)
            return False
        self.write_blob(place, data)
        chunk.slot, chunk.blob, chunk.method = -1, place, method
        return True

    def replace_blob_with_slot(self, chunk: CpuChunk, slot: int) -> None:
        """A compressed chunk (no readers) whose bytes were decompressed into ``slot``
        (reserved) becomes raw there; its blob's arena space is given back."""
        assert chunk.blob is not None and chunk.readers == 0
        self._drop_blob(chunk.blob)
        chunk.blob, chunk.method, chunk.slot = None, None, slot

    def write_blob(self, blob: Blob, data: bytes) -> None:
        at = 0
        for slot, off, length in blob:
            start = slot * self.slot_bytes + off
            self.array[start : start + length] = memoryview(data)[at : at + length]
            at += length

    def blob_memory(self, blob: Blob) -> memoryview | bytes:
        if len(blob) == 1:
            slot, off, length = blob[0]
            start = slot * self.slot_bytes + off
            return memoryview(self.array[start : start + length])
        return b"".join(self.array[s * self.slot_bytes + o : s * self.slot_bytes + o + n].tobytes() for s, o, n in blob)

    def _close_arena(self) -> None:
        slot = self.arena_slot
        self.arena_slot = None
        if slot is not None and self.slot_refs.get(slot) == 0:
            del self.slot_refs[slot]
            self.free.append(slot)

    def _drop_blob(self, blob: Blob) -> None:
        for piece in blob:
            self._unref(piece[0])

    def _unref(self, slot: int) -> None:
        self.slot_refs[slot] -= 1
        if self.slot_refs[slot] == 0:
            del self.slot_refs[slot]
            self.free.append(slot)
            if slot == self.arena_slot:
                self.arena_slot = None

    def check(self) -> None:
        """Internal consistency (tests): every slot is free, raw, arena, or in flight exactly once."""
        raw = [e.slot for e in self.entries.values() if e.blob is None]
        assert all(s >= 0 for s in raw), "a raw chunk without a slot"
        arena = set(self.slot_refs)
        seen = raw + list(self.free) + list(arena)
        assert len(seen) == len(set(seen)), "a slot is used twice"
        assert set(self.lru) <= set(self.entries)
        for slot, refs in self.slot_refs.items():
            live = sum(1 for e in self.entries.values() if e.blob is not None for p in e.blob if p[0] == slot)
            assert live <= refs, f"arena slot {slot}: {live} live blobs, {refs} refs"


def _allocate(nbytes: int, pin: bool) -> tuple[torch.Tensor, str]:
    """The pool tensor and how it is pinned: "registered", "pinned" or "plain"."""
    if not pin:
        return torch.empty(nbytes, dtype=torch.uint8), "plain"
    # Register one plain allocation rather than pin_memory=True: torch's pinned allocator
    # rounds sizes up to a power of two, which would page-lock up to twice the pool.
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    try:
        rc = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        code = rc[0] if isinstance(rc, tuple) else rc
        if int(code) == 0:
            return buffer, "registered"
        log.warning("cudaHostRegister of %d bytes failed (%s); using pin_memory", nbytes, rc)
    except Exception as exc:  # older torch without cudart bindings
        log.warning("cudaHostRegister unavailable (%s); using pin_memory", exc)
    del buffer
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), "pinned"

