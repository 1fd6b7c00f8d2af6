"""The engine block map as it was in Python, kept as the reference the Rust map
(``lmcache_rs.EngineMap``, behind ``engine_blocks.EngineBlocks``) is checked against."""

from __future__ import annotations

from itertools import repeat
from typing import Any

from lmcache_rs import chunk_hashes
from lmcache_rs.controller.engine_blocks import Namespace, Namespaces, location_of, salt_and_usable
from lmcache_rs.controller.kv_events import Cleared, Removed, Stored


# One shared 1-tuple per location name: most blocks sit in one tier.
_ONE_LOCATION: dict[str, tuple[str, ...]] = {}


def _one(location: str) -> tuple[str, ...]:
    locs = _ONE_LOCATION.get(location)
    if locs is None:
        if len(_ONE_LOCATION) > 1024:  # names come from the wire: bound the cache
            return (location,)
        locs = _ONE_LOCATION[location] = (location,)
    return locs


class PyEngineBlocks:
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
            salt, usable = (None, True) if plain else salt_and_usable(ev, 0)
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
                if not salt_and_usable(ev, i)[1]:
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
