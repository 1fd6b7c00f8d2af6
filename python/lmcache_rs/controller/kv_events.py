"""Decoding the KV-cache event stream that vLLM (0.9 to 0.33) and SGLang publish.

One message payload is a msgpack ``KVEventBatch``: ``[ts, [events], data_parallel_rank]``
(0.9.0 has no rank; a map form is accepted too). Each event is ``BlockStored``,
``BlockRemoved`` or ``AllBlocksCleared``, tagged either as a positional array
``["BlockStored", field, ...]`` (vLLM up to 0.23) or as a map ``{"type": "BlockStored", ...}``
(vLLM 0.24 on, SGLang). Fields arrive release by release and trailing defaults are omitted,
so every field past the first few is optional here.

Most payloads (map-tagged events of the common shape) are parsed in Rust
(:func:`parse_kv_batch`): their token ids never become Python objects. The rest come here.
The decoder is tolerant where the stream evolves and strict where a value matters: unknown
event types and unknown fields are counted and skipped; a field of the wrong type makes its
event malformed (counted, skipped); a payload that is not a batch is an error for the caller
to count. Nothing here touches an index.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

import msgspec

from .. import ParsedBatch, parse_kv_batch

STORED = "BlockStored"
REMOVED = "BlockRemoved"
CLEARED = "AllBlocksCleared"

# Positional field order of the array-tagged events (vLLM 0.9 to 0.23); later fields only
# ever arrive in the map form, where they are looked up by name.
STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                 "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window")
REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
KNOWN_FIELDS = {
    STORED: frozenset(STORED_FIELDS) | {"type", "locality", "ownership", "session_id", "lookahead_token_ids"},
    REMOVED: frozenset(REMOVED_FIELDS) | {"type", "locality", "ownership"},
    CLEARED: frozenset({"type"}),
}

# Attention kinds whose blocks form a prefix that a longer prompt reuses from its start
# (sliding-window and Mamba groups do not).
PREFIX_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})

MAX_HASH_BYTES = 64  # engine block hashes as bytes: 32 (sha256) or 16 (xxh3-128) in practice


# A block hash as the fast path accepts it (the same rule as ``_check_hash``).
_Hash = Union[int, Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_HASH_BYTES)]]


class Stored(msgspec.Struct, tag=STORED, forbid_unknown_fields=True, kw_only=True, gc=False):
    """A ``BlockStored``. Also the fast path's schema of the map form: every field it may
    carry, each with the type the tolerant path requires, unknown fields refused (so that
    such an event takes the tolerant path, which counts them)."""

    hashes: list[_Hash] = msgspec.field(name="block_hashes")
    token_ids: list
    block_size: Annotated[int, msgspec.Meta(ge=0, le=1 << 20)]
    parent: Optional[_Hash] = msgspec.field(default=None, name="parent_block_hash")
    medium: Optional[str] = None
    lora_name: Optional[str] = None
    extra_keys: Optional[list] = None
    # read only to pick the attention group (``_prefix_group``), or not at all
    group_idx: Any = None
    kv_cache_spec_kind: Any = None
    lora_id: Any = None
    kv_cache_spec_sliding_window: Any = None
    locality: Any = None
    ownership: Any = None
    session_id: Any = None
    lookahead_token_ids: Any = None


class Removed(msgspec.Struct, tag=REMOVED, forbid_unknown_fields=True, kw_only=True, gc=False):
    hashes: list[_Hash] = msgspec.field(name="block_hashes")
    medium: Optional[str] = None
    group_idx: Any = None
    locality: Any = None
    ownership: Any = None


class Cleared(msgspec.Struct, tag=CLEARED, forbid_unknown_fields=True, gc=False):
    pass


class _FastBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[Union[Stored, Removed, Cleared]]
    dp_rank: Optional[Annotated[int, msgspec.Meta(ge=0, lt=1 << 16)]] = None


class Batch:
    """A decoded payload: Python ``events``, or (``parsed``) a batch held in Rust."""

    __slots__ = ("ts", "events", "dp_rank", "digest", "parsed")

    def __init__(self, ts: float, events: list, dp_rank: int, digest: int = 0, parsed: ParsedBatch | None = None):
        self.ts = ts
        self.events = events
        self.dp_rank = dp_rank
        # a hash of the payload (the native parser's xxh3, else ``hash``; a payload always takes the
        # same path): tells a repeated message from a new one
        self.digest = digest
        self.parsed = parsed

    @property
    def cleared(self) -> bool:
        """Whether an ``AllBlocksCleared`` is among the events."""
        if self.parsed is not None:
            return self.parsed.cleared
        return any(type(e) is Cleared for e in self.events)


class BatchError(ValueError):
    """The payload is not a KV-event batch at all."""


class EventDecoder:
    """Turns payloads into :class:`Batch` es; counts what it skipped in ``counts``.
    ``native=False`` decodes every payload in Python (the reference the Rust parser matches)."""

    def __init__(self, native: bool = True) -> None:
        self.native = native
        self._msgpack = msgspec.msgpack.Decoder()
        self._typed = msgspec.msgpack.Decoder(_FastBatch)
        self.counts: dict[str, int] = {}

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def decode(self, payload: bytes) -> Batch:
        if self.native and type(payload) is bytes:
            parsed = parse_kv_batch(payload)
            if parsed is not None:
                return Batch(parsed.ts, [], parsed.dp_rank, parsed.digest, parsed)
        # The fast path: vLLM >= 0.24's and SGLang's usual batch (an array of 2 to 8 items;
        # more is the tolerant path's error), decoded and type-checked by msgspec in one go.
        # Anything it refuses (arrays of events, unknown fields or types, a bad value) is
        # decoded again by the tolerant path below, which counts or refuses it.
        if payload[:1] and 0x92 <= payload[0] <= 0x98:
            try:
                fast = self._typed.decode(payload)
            except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
                pass
            else:
                events = fast.events
                for event in events:  # (``_prefix_group_of``, inlined: it runs per event)
                    kind = event.kv_cache_spec_kind if type(event) is Stored else None
                    if kind is None:
                        if type(event) is Cleared or event.group_idx is None or event.group_idx == 0:
                            continue
                    elif type(kind) is str and kind in PREFIX_KINDS:
                        continue
                    events = self._keep_main_group(events)
                    break
                return Batch(fast.ts, events, fast.dp_rank or 0, hash(payload))
        try:
            raw = self._msgpack.decode(payload)
        except msgspec.DecodeError as exc:
            raise BatchError(f"not msgpack: {exc}") from None
        except RecursionError:
            raise BatchError("msgpack nested too deeply") from None
        if isinstance(raw, list):
            if not 2 <= len(raw) <= 8:
                raise BatchError(f"a batch array has 2 or 3 items, got {len(raw)}")
            ts, events = raw[0], raw[1]
            rank = raw[2] if len(raw) > 2 else None
        elif isinstance(raw, dict):
            ts, events = raw.get("ts"), raw.get("events")
            rank = raw.get("data_parallel_rank", raw.get("attn_dp_rank"))
        else:
            raise BatchError(f"a batch is an array or a map, got {type(raw).__name__}")
        if type(ts) not in (float, int) or not isinstance(events, list):
            raise BatchError("a batch needs a timestamp and a list of events")
        if rank is None:
            rank = 0
        elif type(rank) is not int or not 0 <= rank < 1 << 16:
            raise BatchError(f"data_parallel_rank must be a small non-negative integer, got {rank!r}")
        out = []
        for event in events:
            decoded = self._event(event)
            if decoded is not None:
                out.append(decoded)
        return Batch(float(ts), out, rank, hash(payload))

    def _keep_main_group(self, events: list) -> list:
        """The events of the main attention group; the others counted, as the tolerant path does."""
        out = []
        for event in events:
            if type(event) is Cleared or _prefix_group_of(event):
                out.append(event)
            else:
                self._count("other_attention_groups")
        return out

    def _event(self, raw: Any) -> Stored | Removed | Cleared | None:
        if isinstance(raw, dict):
            kind = raw.get("type")
            fields = raw
            known = KNOWN_FIELDS.get(kind) if isinstance(kind, str) else None
            if known is not None and not known.issuperset(raw):
                self._count("unknown_fields")
        elif isinstance(raw, list) and raw and type(raw[0]) is str:
            kind = raw[0]
            names = STORED_FIELDS if kind == STORED else REMOVED_FIELDS if kind == REMOVED else ()
            if len(raw) - 1 > len(names) and kind in KNOWN_FIELDS:
                self._count("unknown_fields")
            fields = dict(zip(names, raw[1:]))
        else:
            self._count("malformed_events")
            return None
        try:
            if kind == STORED:
                return self._stored(fields)
            if kind == REMOVED:
                return self._removed(fields)
            if kind == CLEARED:
                return Cleared()
        except ValueError:
            self._count("malformed_events")
            return None
        self._count("unknown_event_types")
        return None

    def _stored(self, f: dict) -> Stored | None:
        if not _prefix_group(f):
            self._count("other_attention_groups")
            return None
        hashes = _hashes(f.get("block_hashes"))
        parent = f.get("parent_block_hash")
        if parent is not None:
            _check_hash(parent)
        token_ids = f.get("token_ids")
        block_size = f.get("block_size")
        if not isinstance(token_ids, list) or type(block_size) is not int or not 0 <= block_size <= 1 << 20:
            raise ValueError("token_ids must be a list and block_size a non-negative integer")
        extra = f.get("extra_keys")
        if extra is not None and not isinstance(extra, list):
            raise ValueError("extra_keys must be a list")
        return Stored(hashes=hashes, parent=parent, token_ids=token_ids, block_size=block_size,
                      medium=_optional_str(f.get("medium")), lora_name=_optional_str(f.get("lora_name")),
                      extra_keys=extra)

    def _removed(self, f: dict) -> Removed | None:
        if not _prefix_group(f):
            self._count("other_attention_groups")
            return None
        return Removed(hashes=_hashes(f.get("block_hashes")), medium=_optional_str(f.get("medium")))


def _prefix_group(f: dict) -> bool:
    """Events of the main full-attention group: by ``kv_cache_spec_kind`` (vLLM 0.22 on), else
    ``group_idx`` 0 (older hybrid streams), else every event (single-group models)."""
    return _is_main_group(f.get("kv_cache_spec_kind"), f.get("group_idx"))


def _prefix_group_of(event: Stored | Removed) -> bool:
    return _is_main_group(getattr(event, "kv_cache_spec_kind", None), event.group_idx)


def _is_main_group(kind: Any, group: Any) -> bool:
    if kind is not None:
        return type(kind) is str and kind in PREFIX_KINDS  # (an unhashable kind must not raise)
    return group is None or group == 0


def _hashes(value: Any) -> list:
    if not isinstance(value, list):
        raise ValueError("block_hashes must be a list")
    for h in value:
        _check_hash(h)
    return value


def _check_hash(h: Any) -> None:
    if type(h) is int:
        return
    if type(h) is bytes and 0 < len(h) <= MAX_HASH_BYTES:
        return
    raise ValueError(f"a block hash is an integer or up to {MAX_HASH_BYTES} bytes")


def _optional_str(value: Any) -> str | None:
    if value is None or type(value) is str:
        return value
    raise ValueError("expected a string or null")
