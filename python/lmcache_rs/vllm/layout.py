"""Where each token's K and V sit in vLLM's paged KV cache, and copies between it and the
store's ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]`` tensors.

vLLM hands a connector one tensor per attention layer; how a block is laid out depends on the
attention backend. One description covers them all: per layer, K and V as two strided views
of shape ``[num_blocks, block_size, num_kv_heads, head_dim]`` over the layer's storage, so
``view[block, offset, head, dim]`` is that element wherever the backend puts it. Copies index
those views with (block, offset) pairs; nothing else knows a backend.

Layouts (``kind``):

* ``cpu``: vLLM's CPU attention, ``[num_blocks, H, N, 2D]``. Per block and head the first
  ``N*D`` values are K transposed (``K[n][d]`` at ``d*N + n``), then V row-major
  (``V[n][d]`` at ``N*D + n*D + d``): the shape's last dimension does not split into K and V.
* ``split``: ``[num_blocks, H, N, 2D]`` on an accelerator (vLLM ≥ 0.32's CUDA backends): per
  token and head, K is the first ``D`` values of the last dimension and V the rest (the
  backends take ``tensor.transpose(1, 2).split(D, -1)``).
* ``kv_first``: ``[2, num_blocks, N, H, D]`` (FlashAttention and most CUDA backends of older vLLM).
* ``blocks_first``: ``[num_blocks, 2, N, H, D]`` (FlashInfer of older vLLM).

The NHD/HND choice of CUDA backends only changes strides, which the views keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Optional, Sequence

import torch

from lmcache_rs import copy_cpu_blocks

KINDS = ("cpu", "split", "kv_first", "blocks_first")
# vLLM's CPU attention kernels (ISAs) whose blocks the ``cpu`` kind describes, as checked
# against vLLM's own cache writer; "amx" (bf16 on AMX CPUs) and "neon" pack blocks otherwise.
CPU_ISAS = ("vec", "vec16")


class UnsupportedLayout(ValueError):
    """A layer tensor that none of the known layouts describes (e.g. MLA's latent cache)."""


@dataclass(frozen=True)
class LayerViews:
    """K and V of one layer, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""

    key: torch.Tensor
    value: torch.Tensor
    # the layer tensor itself when it is a contiguous ``cpu`` layout of 2- or 4-byte elements
    # (blocks ``heads * block_size * 2 * head_dim`` elements apart):
    # whole blocks are then copied out by ``copy_cpu_blocks`` (rust/kv_copy.rs), several times
    # faster than torch's strided gathers of the transposed K; ``packed_bytes`` is its memory
    # as the numpy array that function takes (made once: it costs a few microseconds)
    packed: Optional[torch.Tensor] = None
    packed_bytes: Any = None


def detect_kind(tensor: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int,
                hint: Optional[str] = None) -> str:
    """The layout of one layer tensor, from its shape and device; ``hint`` (one of KINDS)
    settles a shape that fits two layouts (two blocks in all). Raises UnsupportedLayout."""
    shape = tuple(tensor.shape)
    fits = []
    if tensor.dim() == 4 and shape[1:] == (num_kv_heads, block_size, 2 * head_dim):
        fits.extend(["cpu", "split"] if tensor.device.type == "cpu" else ["split"])
    if tensor.dim() == 5 and shape[0] == 2 and shape[2:] == (block_size, num_kv_heads, head_dim):
        fits.append("kv_first")
    if tensor.dim() == 5 and shape[1] == 2 and shape[2:] == (block_size, num_kv_heads, head_dim):
        fits.append("blocks_first")
    if hint in fits:
        return hint
    if len(fits) >= 1:
        return fits[0]
    raise UnsupportedLayout(
        f"KV-cache layer of shape {list(shape)} on {tensor.device} is none of the known paged layouts "
        f"for block_size={block_size}, num_kv_heads={num_kv_heads}, head_dim={head_dim} "
        "(cpu [blocks, H, N, 2D], kv_first [2, blocks, N, H, D], blocks_first [blocks, 2, N, H, D])"
    )


def layer_views(tensor: torch.Tensor, kind: str) -> LayerViews:
    """K and V views of one layer tensor of layout ``kind``."""
    if kind == "kv_first":
        return LayerViews(tensor[0], tensor[1])
    if kind == "blocks_first":
        return LayerViews(tensor[:, 0], tensor[:, 1])
    if kind == "split":
        per_token = tensor.transpose(1, 2)  # [num_blocks, N, H, 2D]
        d = per_token.shape[-1] // 2
        return LayerViews(per_token[..., :d], per_token[..., d:])
    if kind != "cpu":
        raise ValueError(f"unknown layout kind {kind!r}; known: {', '.join(KINDS)}")
    num_blocks, heads, n, two_d = tensor.shape
    d = two_d // 2
    block_stride, head_stride = tensor.stride(0), tensor.stride(1)
    if tensor.stride(1) != n * two_d or tensor.stride(2) != two_d or tensor.stride(3) != 1:
        raise UnsupportedLayout(f"cpu KV-cache layer with strides {tensor.stride()} is not packed per block and head")
    base = tensor.storage_offset()
    shape = (num_blocks, n, heads, d)
    key = torch.as_strided(tensor, shape, (block_stride, 1, head_stride, n), base)
    value = torch.as_strided(tensor, shape, (block_stride, d, head_stride, 1), base + n * d)
    if tensor.is_contiguous() and tensor.element_size() in (2, 4):
        return LayerViews(key, value, tensor, bytes_view(tensor))
    return LayerViews(key, value)


@dataclass(frozen=True)
class TokenRun:
    """Where tokens ``begin..end`` of a request sit in the paged cache, worked out once per
    step for copying them out layer after layer (see ``copy_run``)."""

    ids: tuple[int, ...]  # the blocks the run fills, then the partly filled last one (if any)
    tail: int  # how many tokens of the partly filled last block (0: none)
    device: torch.device
    blocks: Optional[torch.Tensor] = None  # a run starting mid-block: (block, offset) per token
    offsets: Optional[torch.Tensor] = None

    @property
    def full(self) -> int:
        """How many blocks the run fills."""
        return len(self.ids) - (1 if self.tail else 0)

    @property
    def tail_block(self) -> int:
        """The partly filled last block, or -1."""
        return self.ids[-1] if self.tail else -1

    @cached_property
    def whole(self) -> torch.Tensor:
        """The blocks the run fills, as an index tensor on the cache's device (made only when
        a copy needs it: the native CPU copy takes ``ids``)."""
        return torch.as_tensor(self.ids[: self.full], dtype=torch.long).to(self.device)


def token_run(block_ids: Sequence[int], block_size: int, begin: int, end: int, device: torch.device) -> TokenRun:
    """The TokenRun of tokens ``begin..end`` of a request whose KV lives in ``block_ids``."""
    if begin % block_size:
        blocks, offsets = slot_indices(block_ids, block_size, begin, end, device)
        return TokenRun((), 0, device, blocks, offsets)
    first, full, tail = begin // block_size, (end - begin) // block_size, (end - begin) % block_size
    return TokenRun(tuple(int(b) for b in block_ids[first: first + full + (1 if tail else 0)]), tail, device)


def copy_run(views: LayerViews, run: TokenRun, out: torch.Tensor, out_bytes: Any = None) -> None:
    """The K and V of one layer's tokens of ``run`` into ``out`` (``[2, T, H, D]``,
    contiguous, of the cache's dtype and device). From a packed ``cpu`` layer, whole blocks go
    by ``copy_cpu_blocks`` (``out_bytes``, when given, is ``bytes_view(out)``, made once by a
    caller that copies into the same slots layer after layer); otherwise by one index_select
    per K and V, which reorders each block's tokens as it copies: several times cheaper than indexing
    (block, offset) pairs one token at a time, which only a run starting mid-block needs."""
    if run.blocks is not None:
        out[0] = views.key[run.blocks, run.offsets]
        out[1] = views.value[run.blocks, run.offsets]
        return
    packed = views.packed
    if (packed is not None and run.ids and out.dtype == packed.dtype and out.device == packed.device
            and out.is_contiguous()):
        _, heads, block_size, two_d = packed.shape
        copy_cpu_blocks(views.packed_bytes, out_bytes if out_bytes is not None else bytes_view(out), run.ids,
                        run.full * block_size + run.tail, heads, block_size, two_d // 2, heads * block_size * two_d)
        return
    n = run.whole.numel() * views.key.shape[1]
    if n:
        shape = (run.whole.numel(), *views.key.shape[1:])
        torch.index_select(views.key, 0, run.whole, out=out[0, :n].view(shape))
        torch.index_select(views.value, 0, run.whole, out=out[1, :n].view(shape))
    if run.tail:
        out[0, n:] = views.key[run.tail_block, : run.tail]
        out[1, n:] = views.value[run.tail_block, : run.tail]


def bytes_view(tensor: torch.Tensor):
    """A contiguous CPU tensor of 2- or 4-byte elements as a numpy array of integers of that
    size, sharing its memory (numpy has no bfloat16; the copy moves bytes only)."""
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32).numpy()


def slot_indices(block_ids: Sequence[int], block_size: int, start: int, end: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) index tensors of tokens ``start..end`` of a request whose KV lives in
    ``block_ids`` (its blocks in token order)."""
    positions = torch.arange(start, end, dtype=torch.long)
    table = torch.as_tensor(list(block_ids), dtype=torch.long)
    blocks = table[positions // block_size]
    offsets = positions % block_size
    return blocks.to(device), offsets.to(device)


def gather(layers: Sequence[LayerViews], blocks: torch.Tensor, offsets: torch.Tensor,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The KV of the tokens at (blocks, offsets) as ``[num_layers, 2, T, H, D]`` (into ``out``
    when given), on the cache's device."""
    first = layers[0].key
    shape = (len(layers), 2, blocks.numel(), first.shape[2], first.shape[3])
    if out is None:
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
    for i, views in enumerate(layers):
        out[i, 0] = views.key[blocks, offsets]
        out[i, 1] = views.value[blocks, offsets]
    return out


def copy_run_in(layers: Sequence[LayerViews], run: TokenRun, kv: torch.Tensor, first: int) -> bool:
    """Tokens ``first..`` of ``kv`` (``[num_layers, 2, T, H, D]``, as the store retrieves them)
    into ``run``'s blocks of every layer by ``copy_cpu_blocks``, when the layers are packed
    ``cpu`` ones of ``kv``'s dtype, ``kv`` is contiguous and the run starts at a block's start:
    True. False (nothing written) otherwise: ``scatter`` does it."""
    packed = layers[0].packed
    if (packed is None or not run.ids or kv.dtype != packed.dtype or kv.device != packed.device
            or not kv.is_contiguous() or any(views.packed is None for views in layers)):
        return False
    _, heads, block_size, two_d = packed.shape
    tokens = run.full * block_size + run.tail
    kv_bytes = bytes_view(kv)
    for i, views in enumerate(layers):
        copy_cpu_blocks(views.packed_bytes, kv_bytes[i], run.ids, tokens, heads, block_size, two_d // 2,
                        heads * block_size * two_d, to_cache=True, kv_first=first)
    return True


def scatter(layers: Sequence[LayerViews], blocks: torch.Tensor, offsets: torch.Tensor, kv: torch.Tensor) -> None:
    """Write ``kv`` (``[num_layers, 2, T, H, D]``, any device) into the tokens at (blocks, offsets)."""
    device = layers[0].key.device
    if kv.device != device:
        kv = kv.to(device, non_blocking=True)
    for i, views in enumerate(layers):
        views.key[blocks, offsets] = kv[i, 0].to(views.key.dtype)
        views.value[blocks, offsets] = kv[i, 1].to(views.value.dtype)


def describe(kv_caches: Mapping[str, torch.Tensor], block_size: int, num_kv_heads: int, head_dim: int,
             hint: Optional[str] = None) -> tuple[str, list[str], list[LayerViews]]:
    """The layout kind, the layer names in order and their views. Every layer must share one
    kind, dtype and device. Raises UnsupportedLayout."""
    if not kv_caches:
        raise UnsupportedLayout("vLLM registered no KV-cache layers")
    names = list(kv_caches)
    kinds = {detect_kind(kv_caches[name], block_size, num_kv_heads, head_dim, hint) for name in names}
    if len(kinds) != 1:
        raise UnsupportedLayout(f"KV-cache layers of different layouts: {sorted(kinds)}")
    (kind,) = kinds
    tensors = [kv_caches[name] for name in names]
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        raise UnsupportedLayout("KV-cache layers of different dtypes or devices")
    return kind, names, [layer_views(t, kind) for t in tensors]
