"""What each engine that publishes KV events holds, in our key space.

Engines name blocks by their own hashes, which depend on the engine's hash algorithm, seed,
LoRA and salts; lookups come with tokens. So every stored block is re-hashed from its
``token_ids`` into our xxh3 chain (``chunk_hashes``, chunk = the engine's block size,
continuing after the parent block's key), and each engine keeps a map from its block hashes
to ours. Removes, which carry only engine hashes, and token-less tier updates resolve through
that map; a store whose parent the map does not know is counted, never guessed.

Keys live in **namespaces**, one :class:`Index` each: (model, LoRA name, cache salt, block
size). The same tokens under another LoRA or salt are different KV, and blocks of another
size are different chunks.

An engine is one instance with one worker (rank 0): vLLM forwards only the events all its
tensor-parallel workers agree on, and data-parallel ranks are separate engines with caches of
their own, so each rank is its own instance (``<instance>-dp<rank>`` past rank 0).
"""

from __future__ import annotations

from itertools import repeat
from typing import Any, Callable

from .. import Index, chunk_hashes
from .kv_events import Cleared, Removed, Stored

# Engine media -> our location names, in one table (keys compared upper-cased). A medium not
# listed keeps its own name as its location: never silently counted as a faster tier.
MEDIUM_LOCATIONS = {
    "GPU": "GPU", "DEVICE": "GPU", "CUDA": "GPU",
    "CPU": "LocalCPUBackend", "CPU_PINNED": "LocalCPUBackend", "CPU_TIER1": "LocalCPUBackend",
    "LMCACHE-L1": "LocalCPUBackend", "LOCALCPUBACKEND": "LocalCPUBackend",
    "STORAGE": "LocalDiskBackend", "DISK": "LocalDiskBackend", "NVME": "LocalDiskBackend",
    "FS": "LocalDiskBackend", "CPU_TIER2": "LocalDiskBackend", "LOCALDISKBACKEND": "LocalDiskBackend",
}
# vLLM before 0.11 sends no medium: its only publisher then is the GPU block pool.
DEFAULT_LOCATION = "GPU"
MAX_LOCATION_CHARS = 64


_LOCATION_CACHE: dict[str, str] = {}


def location_of(medium: str | None) -> str:
    if medium is None:
        return DEFAULT_LOCATION
    known = _LOCATION_CACHE.get(medium)  # the same few names on every event
    if known is None:
        known = _location_of(medium)
        if len(_LOCATION_CACHE) < 1024:  # names come from the wire: bound the cache
            _LOCATION_CACHE[medium] = known
    return known


def _location_of(medium: str) -> str:
    known = MEDIUM_LOCATIONS.get(medium.upper())
    if known is not None:
        return known
    if 0 < len(medium) <= MAX_LOCATION_CHARS and medium.isprintable():
        return medium
    return "unknown-medium"


class Namespace:
    __slots__ = ("model", "lora_name", "cache_salt", "block_size", "index", "engines", "number")

    def __init__(self, model: str, lora_name: str | None, cache_salt: str | None, block_size: int, seed: int,
                 number: int = 0):
        self.model = model
        self.lora_name = lora_name
        self.cache_salt = cache_salt
        self.block_size = block_size
        self.index = Index(block_size, seed)
        self.engines: set[str] = set()  # instance ids registered in this index
        self.number = number  # position in Namespaces.all(): what an engine's block map stores

    def describe(self) -> dict:
        return {"model": self.model, "lora_name": self.lora_name, "cache_salt": self.cache_salt,
                "block_size": self.block_size}


class Namespaces:
    """Every namespace, created when a first block arrives in it."""

    def __init__(self, seed: int):
        self.seed = seed
        self.by_key: dict[tuple, Namespace] = {}
        # called with each new namespace, returns the index it writes to (an ingest records it)
        self.wrap_index: Callable[[Namespace], Any] | None = None
        # read by lookups on other threads: replaced whole, never mutated
        self._all: tuple[Namespace, ...] = ()

    def get(self, model: str, lora_name: str | None, cache_salt: str | None, block_size: int) -> Namespace:
        key = (model, lora_name, cache_salt, block_size)
        ns = self.by_key.get(key)
        if ns is None:
            ns = self.by_key[key] = Namespace(model, lora_name, cache_salt, block_size, self.seed, len(self._all))
            if self.wrap_index is not None:
                ns.index = self.wrap_index(ns)
            self._all = (*self._all, ns)
        return ns

    def all(self) -> tuple[Namespace, ...]:
        return self._all

    def matching(self, model: str | None, lora_name: str | None, cache_salt: str | None) -> list[Namespace]:
        """The namespaces a lookup asks: any model when none is named, always the given LoRA
        and salt (none named: the base model without a salt)."""
        return [ns for ns in self._all
                if (model is None or ns.model == model) and ns.lora_name == lora_name and ns.cache_salt == cache_salt]


# One shared 1-tuple per location name: most blocks sit in one tier.
_ONE_LOCATION: dict[str, tuple[str, ...]] = {}


def _one(location: str) -> tuple[str, ...]:
    locs = _ONE_LOCATION.get(location)
    if locs is None:
        if len(_ONE_LOCATION) > 1024:  # names come from the wire: bound the cache
            return (location,)
        locs = _ONE_LOCATION[location] = (location,)
    return locs


class EngineBlocks:
    """One engine's blocks: engine block hash -> ``(namespace number, our key, locations)``.

    The values hold only ints, strs and a tuple of strs, which CPython's cyclic collector
    stops tracking: a fleet's maps hold millions of blocks, and per-block objects (one with a
    set of locations each) made every collection walk all of them — half the ingest time.

    ``apply`` turns decoded events into index operations, grouped per namespace, for the
    caller to apply (one ``apply_batch`` per namespace keeps readers from seeing half a batch
    of one namespace). ``counts`` records what could not be applied, by reason."""

    def __init__(self, instance_id: str, model: str, namespaces: Namespaces, counts: dict[str, int]):
        self.instance_id = instance_id
        self.model = model
        self.namespaces = namespaces
        self.blocks: dict[Any, tuple[int, int, tuple[str, ...]]] = {}
        self.counts = counts

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def apply(self, events: list, ops: dict[Namespace, list]) -> None:
        for event in events:
            if type(event) is Stored:
                self._stored(event, ops)
            elif type(event) is Removed:
                self._removed(event, ops)
            elif type(event) is Cleared:
                self.clear(ops)

    def clear(self, ops: dict[Namespace, list]) -> None:
        """Everything this engine holds is gone (AllBlocksCleared, a restart, a lost stream).
        Every tier: an index may miss a hit, never report one that is not there."""
        for ns in self.namespaces_held():
            self._op(ops, ns, "drop", None, b"")
        self.blocks.clear()

    def namespaces_held(self) -> set[Namespace]:
        every = self.namespaces.all()
        return {every[n] for n in {b[0] for b in self.blocks.values()}}

    def _op(self, ops: dict[Namespace, list], ns: Namespace, kind: str, location: str | None, keys: Any) -> None:
        if self.instance_id not in ns.engines:
            ns.index.register_worker(self.instance_id, 0)
            ns.engines.add(self.instance_id)
        batch = ops.get(ns)
        if batch is None:
            ops[ns] = [(kind, self.instance_id, 0, location, keys)]
            return
        last = batch[-1]
        # the same change as the one before, at the same tier: one op (keys are independent
        # entries of the index, so admitting [a] then [b] is admitting [a, b])
        if last[0] == kind and last[3] == location and kind != "drop" and last[1] == self.instance_id:
            last[4].extend(keys)
        else:
            batch.append((kind, self.instance_id, 0, location, keys))

    def _stored(self, ev: Stored, ops: dict[Namespace, list]) -> None:
        location = location_of(ev.medium)
        if not ev.token_ids:
            self._tier_update(ev.hashes, location, ops)
            return
        n = len(ev.hashes)
        size = ev.block_size
        if size < 1 or len(ev.token_ids) != n * size:
            self._count("malformed_events")
            return
        extra = ev.extra_keys
        plain = extra is None or extra.count(None) == len(extra)  # vLLM's usual [None, ...]: text only
        blocks = self.blocks
        if ev.parent is None:
            salt, usable = (None, True) if plain else _salt_and_usable(ev, 0)
            if not usable:
                self._count("multimodal_blocks", n)
                return
            ns = self.namespaces.get(self.model, ev.lora_name, salt, size)
            parent_key = None
        else:
            parent = blocks.get(ev.parent)
            if parent is None:
                self._count("unknown_parent_blocks", n)
                return
            ns = self.namespaces.all()[parent[0]]
            if ns.block_size != size:
                self._count("block_size_changes", n)
                return
            parent_key = parent[1]
        if not plain:
            # blocks with multimodal or embedding inputs have placeholder tokens: stop before them
            for i in range(n):
                if not _salt_and_usable(ev, i)[1]:
                    self._count("multimodal_blocks", n - i)
                    n = i
                    break
            if n == 0:
                return
        tokens = ev.token_ids if n * size == len(ev.token_ids) else ev.token_ids[:n * size]
        try:
            keys = chunk_hashes(tokens, size, self.namespaces.seed, parent=parent_key)
        except (TypeError, ValueError):  # tokens that are not u32 (e.g. bigram pairs)
            self._count("malformed_events")
            return
        number = ns.number
        locs = _one(location)
        hashes = ev.hashes if n == len(ev.hashes) else ev.hashes[:n]
        new = dict(zip(hashes, zip(repeat(number), keys, repeat(locs))))
        if len(new) == n and blocks.keys().isdisjoint(new):
            blocks.update(new)  # the usual store: every block new to this engine
            admitted = keys
        else:
            admitted = []
            for h, key in zip(hashes, keys):
                block = blocks.get(h)
                if block is None:
                    blocks[h] = (number, key, locs)
                elif block[1] != key or block[0] != number:
                    # the engine reused a hash for other content: its old holding is gone
                    self._evict_all(block, ops)
                    blocks[h] = (number, key, locs)
                elif location not in block[2]:
                    blocks[h] = (number, key, block[2] + locs)
                admitted.append(key)
        self._op(ops, ns, "admit", location, admitted)

    def _tier_update(self, hashes: list, location: str, ops: dict[Namespace, list]) -> None:
        """A store without tokens (an offload tier announcing blocks by hash): known blocks
        gain the location; unknown ones cannot be placed."""
        every = self.namespaces.all()
        for h in hashes:
            block = self.blocks.get(h)
            if block is None:
                self._count("unknown_blocks")
                continue
            if location not in block[2]:
                self.blocks[h] = (block[0], block[1], block[2] + (location,))
            self._op(ops, every[block[0]], "admit", location, [block[1]])

    def _removed(self, ev: Removed, ops: dict[Namespace, list]) -> None:
        location = location_of(ev.medium)
        every = self.namespaces.all()
        blocks = self.blocks
        for h in ev.hashes:
            block = blocks.get(h)
            if block is None or location not in block[2]:
                self._count("unknown_removes")
                continue
            locs = block[2]
            if len(locs) == 1:
                del blocks[h]
            else:
                blocks[h] = (block[0], block[1], tuple(x for x in locs if x != location))
            ns = every[block[0]]
            batch = ops.get(ns)
            if batch:  # vLLM sends one remove per event: most follow another at the same tier
                last = batch[-1]
                if last[0] == "evict" and last[3] == location and last[1] == self.instance_id:
                    last[4].append(block[1])
                    continue
            self._op(ops, ns, "evict", location, [block[1]])

    def _evict_all(self, block: tuple, ops: dict[Namespace, list]) -> None:
        ns = self.namespaces.all()[block[0]]
        for location in block[2]:
            self._op(ops, ns, "evict", location, [block[1]])


def _salt_and_usable(ev: Stored, i: int) -> tuple[str | None, bool]:
    """The cache salt named in block ``i``'s extra keys, and whether the block's tokens are
    real text tokens (multimodal placeholders and prompt embeddings are not)."""
    extra = ev.extra_keys
    if extra is None or i >= len(extra) or extra[i] is None:
        return None, True
    entry = extra[i]
    if not isinstance(entry, list):
        return None, False
    salt = None
    for item in entry:
        if type(item) is str:
            if item != ev.lora_name:
                salt = item
        else:
            return None, False  # (mm_id, offset) pairs or an embedding digest
    return salt, True
