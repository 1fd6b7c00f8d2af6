"""The torch KV-cache worker (docs/worker.md): ``KVStore`` holds the chunks of one rank in its
tiers; ``KVWorker`` is a store with its services (reporting to the controller, commands, P2P)."""

from .cpu_backend import LocalCPUBackend
from .disk_backend import LocalDiskBackend
from .store import KVStore
from .synthetic import synthetic_for, synthetic_kv
from .worker import KVWorker

__all__ = ["KVStore", "KVWorker", "LocalCPUBackend", "LocalDiskBackend", "synthetic_for", "synthetic_kv"]
