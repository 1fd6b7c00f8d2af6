"""The torch KV-cache worker (docs/worker.md): ``KVStore`` holds the chunks of one rank in its
tiers; ``KVWorker`` is a store with its services (reporting to the controller, commands, P2P).

The names load on first use, so ``lmcache_worker --help`` and config errors answer before
torch is imported (seconds)."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "KVStore": ".store", "KVWorker": ".worker", "LocalCPUBackend": ".cpu_backend",
    "LocalDiskBackend": ".disk_backend", "synthetic_for": ".synthetic", "synthetic_kv": ".synthetic",
}

__all__ = ["KVStore", "KVWorker", "LocalCPUBackend", "LocalDiskBackend", "synthetic_for", "synthetic_kv"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
