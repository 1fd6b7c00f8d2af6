"""Lossless chunk compression: byte-plane split, then zlib.

Method ``"byteplane-zlib"`` (alias ``"zlib"``), for any dtype of element size ``w``:

1. view the chunk's raw bytes as ``[n, w]`` (n elements, little-endian bytes of each);
2. transpose to ``[w, n]``: all first bytes, then all second bytes, ... ("byte planes");
3. compress the planes with zlib (level 1 by default, fast).

KV values of neighbouring elements share sign and exponent, so the high byte plane of a
bf16/fp16 tensor is highly repetitive and compresses well, while mantissa planes stay
close to random. Decompression reverses the steps and gives back the exact bytes, so a
compressed chunk is retrieved bit for bit. A chunk that would not get smaller is left as is.

The blob starts with a 1-byte header, the element width, so a blob decodes on its own.
"""

from __future__ import annotations

import zlib

import numpy as np

METHODS = {"byteplane-zlib": "byteplane-zlib", "zlib": "byteplane-zlib"}
DEFAULT_METHOD = "byteplane-zlib"


def canonical_method(method: str | None) -> str:
    """The method's canonical name. Raises ValueError naming the known methods."""
    name = METHODS.get(method or DEFAULT_METHOD)
    if name is None:
        raise ValueError(f"unknown compression method {method!r}; known: {', '.join(sorted(METHODS))}")
    return name


def compress(data: memoryview | bytes, element_size: int, level: int = 1) -> bytes:
    raw = np.frombuffer(data, dtype=np.uint8)
    if element_size < 1 or raw.size % element_size:
        raise ValueError(f"{raw.size} bytes are not whole elements of {element_size} bytes")
    planes = raw.reshape(-1, element_size).T.copy()
    return bytes([element_size]) + zlib.compress(planes.tobytes(), level)


def decompress_into(blob: memoryview | bytes, out: memoryview) -> None:
    """Decode ``blob`` into ``out`` (exactly the original length). Raises ValueError if corrupt."""
    element_size = blob[0]
    try:
        planes = zlib.decompress(bytes(blob[1:]))
    except zlib.error as exc:
        raise ValueError(f"corrupt compressed chunk: {exc}") from None
    if len(planes) != len(out) or element_size < 1 or len(planes) % element_size:
        raise ValueError(f"compressed chunk decodes to {len(planes)} bytes, expected {len(out)}")
    target = np.frombuffer(out, dtype=np.uint8).reshape(-1, element_size)
    target[...] = np.frombuffer(planes, dtype=np.uint8).reshape(element_size, -1).T


def decompress(blob: memoryview | bytes, nbytes: int) -> bytearray:
    out = bytearray(nbytes)
    decompress_into(blob, memoryview(out))
    return out
