"""The torch KV-cache worker: tiers, reporting to the controller, commands, P2P (docs/worker.md)."""

from .cpu_backend import LocalCPUBackend
from .disk_backend import LocalDiskBackend
from .engine import KVWorker
from .synthetic import synthetic_for, synthetic_kv

__all__ = ["KVWorker", "LocalCPUBackend", "LocalDiskBackend", "synthetic_for", "synthetic_kv"]
