"""Turn fuzz bytes into structured-but-wrong inputs, deterministically and without atheris.

The same bytes give the same input whether atheris drives the target or the smoke test
replays the corpus, so every checked-in corpus file reproduces without the fuzzer.
"""

from __future__ import annotations

import json
from typing import Any


class Reader:
    """Consumes fuzz bytes; returns zeros once they run out (never raises)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def below(self, n: int) -> int:
        return self.byte() % n if n > 0 else 0

    def u16(self) -> int:
        return self.byte() | self.byte() << 8

    def pick(self, options):
        return options[self.below(len(options))]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return bytes(out)

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return bytes(out)

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


EDGE_INTS = [0, 1, -1, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
             2**64, -(2**63), -(2**63) - 1, 10**30]
EDGE_STRS = ["", "inst_a", "inst_b", "nope", "event_id", "layout_info", "LocalCPUBackend", "GPU",
             "LocalDiskBackend", "all", "*", "x" * 300, "\u00e9\u4e2d", "\x00", "../../etc/passwd", "127.0.0.1",
             "zstd", "lz4", "{}", "null", "tokens"]
EDGE_FLOATS = [0.0, -0.0, 1.5, 1e308, float("inf"), float("-inf"), float("nan")]


def value(r: Reader, depth: int = 0) -> Any:
    """Any JSON-ish (and msgpack-ish) value, biased to edges."""
    kind = r.below(10 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return bool(r.byte() & 1)
    if kind == 2:
        return r.pick(EDGE_INTS)
    if kind == 3:
        return r.u16() - 1000
    if kind == 4:
        return r.pick(EDGE_STRS)
    if kind == 5:
        return r.pick(EDGE_FLOATS)
    if kind == 6:
        return r.take(r.below(24)).decode("utf-8", "replace")
    if kind == 7:
        return tokens(r)
    if kind == 8:
        return [value(r, depth + 1) for _ in range(r.below(4))]
    return {str(value(r, depth + 1))[:20]: value(r, depth + 1) for _ in range(r.below(4))}


def tokens(r: Reader) -> list:
    """A token list: usually valid u32s, sometimes with one wrong element."""
    n = r.below(40)
    out: list[Any] = [r.u16() % 64 for _ in range(n)]
    if out and r.below(4) == 0:
        out[r.below(len(out))] = value(r, 3)
    return out


def nest(r: Reader) -> str:
    """A deeply nested JSON text (recursion limits of parsers)."""
    depth = 1 + r.u16() % 5000
    open_, close = r.pick([("[", "]"), ('{"a":', "}")])
    return open_ * depth + "1" + close * depth


def json_text(obj: Any, r: Reader) -> bytes:
    """Serialise, then maybe damage it (a flipped, cut or inserted byte)."""
    try:
        text = json.dumps(obj, allow_nan=True).encode()
    except (TypeError, ValueError, RecursionError):
        text = b"{}"
    how = r.below(8)
    if how == 0 and text:
        i = r.below(len(text))
        text = text[:i] + bytes([r.byte()]) + text[i + 1:]
    elif how == 1 and text:
        text = text[: r.below(len(text))]
    elif how == 2:
        i = r.below(len(text) + 1)
        text = text[:i] + r.take(r.below(8)) + text[i:]
    return text
