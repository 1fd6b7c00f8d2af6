"""lmcache_rs: an exact KV-cache index and controller for LLM serving.

``Index`` is the chunked-prefix radix index (implemented in Rust); ``chunk_hashes`` computes
the chunk keys every component agrees on; ``lmcache_chunk_hashes`` and
``python_str_hash`` reproduce the keys LMCache's own workers compute with Python's ``hash()``;
``copy_cpu_blocks`` copies KV blocks out of vLLM's CPU paged cache for the vLLM connector;
``lookup_body_names`` tells the controller which /lookup bodies name a namespace.
See rust/README.md for the design.
"""

from ._core import (
    EngineMap,
    EngineOps,
    Index,
    InvalidArgumentError,
    InvalidTypeError,
    LMCacheError,
    ParsedBatch,
    SnapshotError,
    __version__,
    chunk_hashes,
    copy_cpu_blocks,
    lmcache_chunk_hashes,
    lookup_body_names,
    parse_kv_batch,
    python_str_hash,
    read_lmcache_push,
    runtime_info,
)

__all__ = [
    "EngineMap",
    "EngineOps",
    "Index",
    "InvalidArgumentError",
    "InvalidTypeError",
    "LMCacheError",
    "ParsedBatch",
    "SnapshotError",
    "__version__",
    "chunk_hashes",
    "copy_cpu_blocks",
    "lmcache_chunk_hashes",
    "lookup_body_names",
    "parse_kv_batch",
    "python_str_hash",
    "read_lmcache_push",
    "runtime_info",
]
