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

from typing import Any, Callable

from .. import EngineMap, EngineOps, Index, ParsedBatch
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
    kind, colon, index = medium.rpartition(":")
    # a device with its index ("cuda:0", as torch names one) is that device's tier
    known = MEDIUM_LOCATIONS.get((kind if colon and index.isascii() and index.isdigit() else medium).upper())
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


class EngineBlocks:
    """One engine's blocks: engine block hash -> ``(namespace number, our key, locations)``,
    held in Rust (:class:`EngineMap`), so millions of blocks are no Python objects.

    Batches parsed in Rust (``apply_parsed``) and events decoded in Python (``apply``) change
    the same map; both queue index operations per namespace, which ``take_ops`` hands out
    (one ``apply_batch`` per namespace keeps readers from seeing half a batch of one
    namespace). ``counts`` records what could not be applied, by reason."""

    def __init__(self, instance_id: str, model: str, namespaces: Namespaces, counts: dict[str, int]):
        self.instance_id = instance_id
        self.model = model
        self.namespaces = namespaces
        self.map = EngineMap(instance_id, namespaces.seed, counts)
        self.counts = counts

    def __len__(self) -> int:
        return len(self.map)

    def holdings(self) -> dict[Any, tuple[int, int, tuple[str, ...]]]:
        """Every block (a copy): engine hash -> (namespace number, our key, locations)."""
        return self.map.holdings()

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def apply_parsed(self, batch: ParsedBatch) -> None:
        missing = self.map.apply_parsed(batch)
        if missing:  # a block size this engine starts sequences in for the first time
            for size in missing:
                self.map.set_root_namespace(size, self.namespaces.get(self.model, None, None, size).number)
            self.map.apply_parsed(batch)

    def apply(self, events: list) -> None:
        for event in events:
            if type(event) is Stored:
                self._stored(event)
            elif type(event) is Removed:
                self.map.remove(event.hashes, location_of(event.medium))
            elif type(event) is Cleared:
                self.map.clear()

    def clear(self) -> None:
        """Everything this engine holds is gone (AllBlocksCleared, a restart, a lost stream).
        Every tier: an index may miss a hit, never report one that is not there."""
        self.map.clear()

    def forget(self) -> None:
        """Drop the map without index operations (the engine's holders are removed whole)."""
        self.map.forget()

    def namespaces_held(self) -> set[Namespace]:
        every = self.namespaces.all()
        return {every[n] for n in self.map.namespaces_held()}

    def take_ops(self) -> list[tuple[Namespace, EngineOps]]:
        """The index operations queued since the last call, per namespace; the engine is
        registered in each namespace's index first."""
        every = self.namespaces.all()
        out = []
        for number, ops in self.map.take_pending():
            ns = every[number]
            if self.instance_id not in ns.engines:
                ns.index.register_worker(self.instance_id, 0)
                ns.engines.add(self.instance_id)
            out.append((ns, ops))
        return out

    def _stored(self, ev: Stored) -> None:
        location = location_of(ev.medium)
        if not ev.token_ids:
            self.map.tier_update(ev.hashes, location)
            return
        n = len(ev.hashes)
        size = ev.block_size
        if size < 1 or len(ev.token_ids) != n * size:
            self._count("malformed_events")
            return
        extra = ev.extra_keys
        plain = extra is None or extra.count(None) == len(extra)  # vLLM's usual [None, ...]: text only
        usable = n
        if not plain:
            # blocks with multimodal or embedding inputs have placeholder tokens: stop before them
            usable = next((i for i in range(n) if not salt_and_usable(ev, i)[1]), n)
        number = None
        if ev.parent is None:
            salt = None if plain else salt_and_usable(ev, 0)[0]
            if usable == 0:
                self._count("multimodal_blocks", n)
                return
            number = self.namespaces.get(self.model, ev.lora_name, salt, size).number
        tokens = ev.token_ids if usable == n else ev.token_ids[:usable * size]
        self.map.store(ev.hashes, ev.parent, tokens, size, location, number, usable)


def salt_and_usable(ev: Stored, i: int) -> tuple[str | None, bool]:
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
