"""What both tiers keep the same way: their chunks by key, and the LRU order of the unpinned ones."""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

Chunk = TypeVar("Chunk")


class LruEntries(Generic[Chunk]):
    """``entries`` holds every chunk; ``lru`` the unpinned keys, least recently used first
    (pinned chunks are never chosen to make room). Called with the worker's lock held."""

    def __init__(self) -> None:
        self.entries: dict[int, Chunk] = {}
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()

    def __contains__(self, key: int) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def touch(self, key: int) -> None:
        if key in self.lru:
            self.lru.move_to_end(key)

    def set_pinned(self, key: int, pinned: bool) -> None:
        if key not in self.entries:
            return
        if pinned:
            self.lru.pop(key, None)
        elif key not in self.lru:
            self.lru[key] = None
