"""Type stub of the native module. Users import from ``lmcache_rs``, never ``_core``."""

import os
from typing import Any, Iterable, Sequence, Union, final

__version__: str
__all__ = [
    "chunk_hashes",
    "copy_cpu_blocks",
    "lmcache_chunk_hashes",
    "lookup_body_names",
    "python_str_hash",
    "runtime_info",
    "parse_kv_batch",
    "read_lmcache_push",
    "Index",
    "EngineMap",
    "EngineOps",
    "ParsedBatch",
    "LMCacheError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "SnapshotError",
    "__version__",
]

# Anything holding token ids: list[int] (or another ordered sequence of int), array.array,
# numpy int32/int64/uint32 arrays, CPU torch tensors, or bytes/memoryview of little-endian u32.
# (Private names: type aliases do not exist at runtime.)
_TokensLike = Union[Sequence[int], bytes, bytearray, memoryview, Any]
# Chunk keys: list[int], array.array('Q'), numpy uint64/int64, or bytes of little-endian u64.
# Ints may be negative down to -2**63 (LMCache's signed keys): stored as their two's complement.
_HashesLike = Union[Sequence[int], bytes, bytearray, memoryview, Any]

class LMCacheError(Exception):
    """Root of every error the index raises."""

class InvalidArgumentError(LMCacheError, ValueError):
    """An argument has the right type but a bad value (negative token, unknown op, ...)."""

class InvalidTypeError(LMCacheError, TypeError):
    """An argument has a type the index does not accept."""

class SnapshotError(LMCacheError, ValueError):
    """A dump file is corrupt, truncated, of another format version or for another index."""

def runtime_info() -> dict[str, Any]:
    """What this build does on the running interpreter: ``version``, and ``fast_int_lists``
    (whether lists and tuples of int are read straight from CPython's int objects, as on
    CPython 3.10-3.14 with the GIL after a self-check at first use, or through the C API)."""

def chunk_hashes(tokens: _TokensLike, chunk_size: int = 256, seed: int = 0, *, parent: int | None = None) -> list[int]:
    """Chained seeded xxh3-64 keys of the chunks of ``tokens`` (see rust/README.md); with
    ``parent``, the keys continue the chain after that key.

    Raises InvalidTypeError / InvalidArgumentError on bad tokens or chunk_size == 0.
    """

def lmcache_chunk_hashes(tokens: _TokensLike, chunk_size: int = 256, none_hash: int = 0) -> list[int]:
    """LMCache 0.5's chunk keys of ``tokens``, as signed ints exactly as CPython computes them:
    ``key[-1] = none_hash``, ``key[i] = hash((key[i-1], tuple(chunk_i), ()))`` with the
    builtin ``hash``; the final partial chunk is hashed too. ``none_hash`` is a signed 64-bit
    int (LMCache's ``NONE_HASH``). The keys of ``Index(key_space="lmcache_builtin")``.

    Raises InvalidTypeError / InvalidArgumentError on bad tokens, chunk_size == 0 or a
    none_hash outside -2**63..2**63-1.
    """

def lookup_body_names(body: bytes, names: tuple[str, ...]) -> bool:
    """Whether a /lookup body's top-level object gives one of ``names`` a value other than
    null, read without its tokens list. Exact for JSON (a JSON value that is not an object names
    nothing); unspecified for a body that is not JSON."""

def python_str_hash(text: str, hash_seed: int, siphash: str = "siphash13") -> int:
    """``hash(text)`` of a 64-bit CPython started with ``PYTHONHASHSEED=hash_seed``
    (0..4294967295; 0 disables randomization), signed. ``siphash`` is the interpreter's str hash:
    ``"siphash13"`` for CPython 3.11 and later, ``"siphash24"`` for 3.10. E.g. LMCache's
    ``NONE_HASH`` with vLLM installed is ``python_str_hash(str(seed), seed)``. Strings with lone
    surrogates are refused (InvalidArgumentError).
    """

@final
class Index:
    """The chunked-prefix index of KV-cache holders. Thread-safe: lookups never wait for writers.

    Tokens are cut into chunks of ``chunk_size`` (the final partial chunk is a chunk too), each
    keyed by a chained hash of the chunks before it: ``"xxh3"`` (``chunk_hashes``, with
    ``seed``) or ``"lmcache_builtin"`` (LMCache's builtin ``hash()`` chain,
    ``lmcache_chunk_hashes``, started from ``none_hash``). A holder is (instance_id, worker_id,
    location); an instance matches a chunk at a location only when every worker it has holds
    it there.

    >>> ix = Index(chunk_size=4)
    >>> ix.admit("inst", 0, "LocalCPUBackend", tokens=list(range(10)))
    3
    >>> ix.lookup(list(range(8)) + [99])
    {'inst': ('LocalCPUBackend', 8)}

    Every method raises InvalidTypeError / InvalidArgumentError (naming the argument) on bad
    input, including unknown keyword arguments, and then changes nothing. (A missing required
    argument is refused by Python's call itself: a plain TypeError, of which InvalidTypeError
    is a subclass.) With ``"lmcache_builtin"``, ``seed`` must be 0; with ``"xxh3"``,
    ``none_hash`` must be 0. Keys given as ``hashes=`` must be of the index's key space.

    A thread's first call registers it as a reader; that one step may wait for a write being
    published. Buffers that can be written to (numpy arrays, bytearray, array.array) are copied
    before the index reads them without the GIL; read-only ones (bytes, a numpy array after
    ``setflags(write=False)``) are read in place. A buffer another thread writes during the
    call may still be read half old, half new."""

    def __new__(
        cls, chunk_size: int = 256, seed: int = 0, *, key_space: str = "xxh3", none_hash: int = 0
    ) -> Index: ...
    @property
    def chunk_size(self) -> int:
        """Tokens per chunk."""
    @property
    def seed(self) -> int:
        """The xxh3 seed of the chunk keys (0 for "lmcache_builtin")."""
    @property
    def key_space(self) -> str:
        """"xxh3" or "lmcache_builtin"."""
    @property
    def none_hash(self) -> int:
        """The chain's starting key of "lmcache_builtin" (0 for "xxh3")."""
    def register_worker(self, instance_id: str, worker_id: int) -> None:
        """Register a worker of an instance (it holds nothing yet). While registered, the instance
        matches a chunk only where this worker holds it too."""
    def remove_worker(self, instance_id: str, worker_id: int) -> int:
        """Unregister the worker and drop all its holdings; returns holdings dropped."""
    def workers(self) -> dict[str, list[int]]:
        """Live workers per instance: {instance_id: [worker_id, ...]}."""
    def admit(
        self,
        instance_id: str,
        worker_id: int,
        location: str,
        tokens: _TokensLike | None = None,
        hashes: _HashesLike | None = None,
    ) -> int:
        """Record that the worker holds these chunks at location; give exactly one of tokens=
        (hashed here) or hashes= (chunk keys already computed). An unknown worker is registered.
        Returns the number of new (holder, chunk) holdings."""
    def evict(
        self,
        instance_id: str,
        worker_id: int,
        location: str,
        tokens: _TokensLike | None = None,
        hashes: _HashesLike | None = None,
    ) -> int:
        """Forget that the worker holds these chunks at location (tokens= or hashes=); returns
        holdings removed."""
    def apply_batch(
        self, events: Iterable[tuple[str, str, int, str | None, _HashesLike | None]]
    ) -> tuple[int, int]:
        """Apply many ("admit" | "evict", instance_id, worker_id, location, hashes) events, and
        ("drop", instance_id, worker_id, location | None, ignored): drop what the worker holds at
        that location (None: anywhere), keeping it registered. Validated as a whole first (a bad
        event raises and nothing is applied), then applied in order and published at once:
        readers see all of it or none. Returns (admitted, evicted), drops counted as evicted."""
    def start_write_behind(self) -> None:
        """Start a thread that applies ``apply_batch_later``'s batches in order, behind the caller
        (once; a second call does nothing). From then on every other write, ``dump`` and
        ``check_invariants`` first wait until the batches queued are applied."""
    def apply_batch_later(
        self, events: Iterable[tuple[str, str, int, str | None, _HashesLike | None]]
    ) -> None:
        """``apply_batch``, validated now and applied by the write-behind thread after the batches
        queued before it: readers see it a little later, all of it or none. Waits while that
        thread is a few batches behind. ``settle()`` waits for it and returns its counts."""
    def settle(self) -> tuple[int, int]:
        """Wait until every batch queued by ``apply_batch_later`` (or ``EngineOps.apply_later``) is
        applied; returns their (admitted, evicted) since the last ``settle`` ((0, 0) when
        nothing writes behind). Raises LMCacheError if a queued write failed (a bug; it is
        lost, as it would have raised written directly), keeping the counts for the next settle."""
    @property
    def writes_behind(self) -> bool:
        """Whether ``start_write_behind`` was called."""
    def clear(self, instance_id: str, location: str | None = None) -> int:
        """Drop the instance's holdings (at one location, or all); returns holdings dropped."""
    def lookup(self, tokens: _TokensLike) -> dict[str, tuple[str, int]]:
        """{instance_id: (location, matched_prefix_length)} for every instance with a match: the
        tokens of its longest run of matched chunks from the start, at the location with the
        longest match (ties: the faster tier)."""
    def lookup_keys(self, hashes: _HashesLike) -> dict[str, tuple[str, int]]:
        """Like ``lookup``, for chunk keys already computed (e.g. a peer's): {instance_id:
        (location, matched chunks)}."""
    def lookup_detailed(self, tokens: _TokensLike) -> dict[str, dict[str, Any]]:
        """{instance_id: {"location", "matched_prefix_length", "locations": {location: n},
        "workers": {worker_id: {location: n}}}}: the instance-wide match per location and each
        worker's own prefix per location. Instances where some worker holds a prefix appear even
        when the instance as a whole has none (location None, matched_prefix_length 0)."""
    def lookup_json(self, body: bytes, event_id: str, detail: bool = False) -> bytes:
        """Parse a /lookup body ``{"tokens": [...], ...}`` and return the response body:
        ``{"event_id": ..., "layout_info": {inst: [loc, n]}, inst: [loc, n], ...}`` (with
        detail: ``"detail": {...lookup_detailed...}`` added). Raises InvalidArgumentError naming
        the problem on a malformed body."""
    def lookup_json_counted(self, body: bytes, event_id: str, detail: bool = False) -> tuple[bytes, int, int]:
        """``lookup_json`` and what it matched: (response body, tokens asked, tokens of the
        longest prefix any instance holds, 0 without a match), for the hit-ratio metrics."""
    def answer_lookups(
        self, data: bytes, event_prefix: str, first_id: int, max_header_bytes: int, max_body_bytes: int,
        extra_header: bytes = b"", leave_named: tuple[str, ...] = (),
    ) -> tuple[bytes, int, list[float], bool, int, int, int]:
        """The controller's /lookup fast path (rust/http_fast.rs): answer the complete plain
        ``POST /lookup`` requests at the start of ``data`` (bytes a connection received), the
        n-th answered one with event id ``event_prefix + str(first_id + n)``, with the GIL
        released, stopping at the first request it leaves to the general HTTP server. Returns
        (responses, bytes consumed, seconds per answered request, whether the last one closes
        the connection, lookups that matched, tokens asked, tokens matched). ``extra_header``:
        header lines (each ending in CRLF) every response carries. ``leave_named``: field
        names that leave a request to the caller when its body gives one of them a value other
        than null (``lookup_body_names``). Raises InvalidTypeError when ``data`` or
        ``extra_header`` is not bytes or ``leave_named`` not a tuple of str."""
    def digest(self) -> int:
        """An order-independent 64-bit digest of the holdings and registered workers: the
        wrapping sum of xxh3_64(b"h" + key u64 LE + worker u32 LE + instance + b"\\0" + location)
        over every (chunk key, holder) pair plus xxh3_64(b"w" + worker u32 LE + instance) over
        every registered worker. Equal for any two indexes that hold the same."""
    def holder_counts(self) -> list[tuple[str, int, str, int]]:
        """[(instance_id, worker_id, location, chunks held)] for every holder."""
    def stats(self) -> dict[str, int]:
        """{"chunks" (distinct chunk keys), "nodes", "holders", "holdings" ((holder, chunk) pairs),
        "instances", "workers", "holder_sets", "bytes" (heap bytes, both copies)}."""
    def check_invariants(self) -> None:
        """Raise LMCacheError describing the first broken invariant (a bug, never caused by input)."""
    def dump(self, path: str | os.PathLike[str], log_seq: int = 0) -> None:
        """Write a versioned, checksummed snapshot atomically (temp file + fsync + rename).
        ``log_seq`` records the position in a replicated operation log that this state
        reflects (0: none); ``load`` returns it. Raises OSError naming ``path`` (e.g.
        FileNotFoundError with ``.filename``) if it cannot be written; the target is then
        untouched."""
    def load(self, path: str | os.PathLike[str]) -> int:
        """Replace the contents with a snapshot; returns the log position it was dumped with (0
        for none, and for files of older format versions). A corrupt, foreign or mismatched
        (chunk_size, key space, seed or none_hash) file raises SnapshotError and leaves the
        index as it was; a file that cannot be read raises OSError naming ``path`` (e.g.
        FileNotFoundError)."""
    def __len__(self) -> int:
        """Number of distinct chunk keys."""

@final
class ParsedBatch:
    """A KV-event batch parsed in Rust (token ids stay Rust memory), for ``EngineMap.apply_parsed``."""
    @property
    def ts(self) -> float: ...
    @property
    def dp_rank(self) -> int: ...
    @property
    def digest(self) -> int:
        """xxh3 of the payload: tells a repeated message from a new one (faster than ``hash``)."""
    @property
    def root_sizes(self) -> list[int]:
        """Block sizes of the stores without a parent, first seen first: their namespaces must
        exist before the batch is applied."""
    @property
    def cleared(self) -> bool:
        """Whether an ``AllBlocksCleared`` is among the events."""
    def __len__(self) -> int: ...

def parse_kv_batch(payload: bytes) -> ParsedBatch | None:
    """The batch in ``payload`` when it has the common shape (map-tagged ``BlockStored`` /
    ``BlockRemoved`` / ``AllBlocksCleared`` of the main attention group, no LoRA, text only,
    known fields); ``None`` for anything else, including malformed payloads."""

# One holder's messages in a segment: (instance_id, worker_id, location, frames, first_seq,
# last_seq, gaps [(expected, got)], runs [("admit" | "evict", keys as native 64-bit words)]).
_PushHolder = tuple[str, int, str, int, int, int, list[tuple[int, int]], list[tuple[str, bytes]]]

def read_lmcache_push(frames: list[bytes]) -> list[tuple[int, int, list[_PushHolder]]]:
    """The frames of one read of the pull socket that have the common shape (a
    ``BatchedKVOperationMsg`` of admits and evicts, known fields only), as segments of
    consecutive frames: ``[(start, end, holders)]``, each holder ``(instance_id, worker_id,
    location, frames, first_seq, last_seq, gaps, runs)`` in first-seen order, ``gaps`` the
    sequence jumps between its messages ``[(expected, got)]``, ``runs`` its operations as
    ``[("admit" | "evict", keys as native 64-bit words)]`` in order. Frames outside every
    segment (other messages, other shapes, malformed bytes, objects that are not bytes) are
    left to the caller."""

def copy_cpu_blocks(
    cache: Any,
    kv: Any,
    blocks: Sequence[int],
    tokens: int,
    heads: int,
    block_size: int,
    head_dim: int,
    block_stride: int,
    to_cache: bool = False,
    kv_first: int = 0,
) -> None:
    """Copy the first ``tokens`` tokens of ``blocks`` between ``cache``, one layer of vLLM's
    CPU paged cache (``[num_blocks, heads, block_size, 2 * head_dim]``, ``block_stride``
    elements from one block to the next; per block and head K transposed, then V), and ``kv``,
    ``[2, tokens, heads, head_dim]``: out of the cache into ``kv``, or with ``to_cache`` from
    tokens ``kv_first..kv_first + tokens`` of ``kv`` (``[2, T, heads, head_dim]``) into the
    cache, leaving the rest of a partly filled last block as it is. Both are C-contiguous
    buffers of one item size (2 or 4 bytes), the one written writable and apart from the
    other; bytes are moved, never converted. Raises InvalidArgumentError for sizes, blocks or
    buffers that do not fit."""

@final
class EngineOps:
    """One namespace's index operations from an ``EngineMap``."""
    def apply_to(self, index: Any) -> tuple[int, int]:
        """Apply to ``index`` as one ``apply_batch``; returns (admitted, evicted). An ``Index`` takes
        the operations as they are; any other object with an ``apply_batch`` (an index that also
        records what it applies) is handed them in ``apply_batch``'s form."""
    def apply_later(self, index: Index) -> None:
        """Queue for ``index``'s write-behind thread (``Index.apply_batch_later``); the counts come
        from ``index.settle()``. Only an ``Index`` that writes behind takes this: an index that
        records what it applies takes ``apply_to``."""
    @staticmethod
    def join(ops: Sequence[EngineOps]) -> EngineOps:
        """One ``EngineOps`` doing what ``ops`` do applied one after another (of one namespace,
        typically from several engines): queued as one write, it wakes the index's writer once."""
    def as_tuples(self) -> list[tuple[str, str, int, str | None, list[int]]]:
        """The operations in ``Index.apply_batch``'s form."""
    def __len__(self) -> int: ...

@final
class EngineMap:
    """One engine's blocks: engine block hash -> (namespace number, our key, locations).
    Changes queue index operations per namespace (``take_pending``); what cannot be applied is
    added to ``counts`` by reason."""
    def __new__(cls, instance_id: str, seed: int, counts: dict[str, int]) -> EngineMap: ...
    @property
    def instance_id(self) -> str: ...
    def __len__(self) -> int: ...
    def store(
        self,
        hashes: Sequence[int | bytes],
        parent: int | bytes | None,
        token_ids: _TokensLike,
        block_size: int,
        location: str,
        namespace: int | None,
        usable: int,
    ) -> None:
        """A store with tokens, checked by the caller: ``block_size >= 1`` and whole blocks of
        every hash. ``namespace``: where a store without parent goes; ``usable``: how many
        leading blocks are plain text (the rest are counted as multimodal)."""
    def tier_update(self, hashes: Sequence[int | bytes], location: str) -> None:
        """A store without tokens: known blocks gain ``location``."""
    def remove(self, hashes: Sequence[int | bytes], location: str) -> None: ...
    def clear(self) -> None:
        """Everything is gone: one drop per namespace held."""
    def forget(self) -> None:
        """Forget every block and the operations not yet taken, without operations."""
    def set_root_namespace(self, block_size: int, namespace: int) -> None:
        """Where parsed stores without a parent of ``block_size`` go."""
    def apply_parsed(self, batch: ParsedBatch) -> list[int]:
        """Apply a parsed batch. When a block size its stores start with has no namespace yet
        (``set_root_namespace``), nothing is applied and those sizes are returned."""
    def take_pending(self) -> list[tuple[int, EngineOps]]:
        """The index operations queued since the last call: (namespace number, operations), in
        the order the namespaces were first touched."""
    def namespaces_held(self) -> list[int]:
        """Namespace numbers this engine holds blocks in."""
    def holdings(self) -> dict[int | bytes, tuple[int, int, tuple[str, ...]]]:
        """Every block: {engine hash: (namespace number, key, locations)} (a copy)."""
