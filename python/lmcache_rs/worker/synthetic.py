"""Deterministic synthetic KV caches, for --preload, demos, tests and benchmarks.

The value at (layer, k/v, position, head, dim) depends only on the token at that position,
the position itself and the indices, so a prompt that extends another gets the same KV for
the shared prefix, in every process. Values are multiples of 1/16 in [-8, 8): exact in
float16, bfloat16 and float32, and compressible like real KV (few distinct exponents).
"""

from __future__ import annotations

from typing import Sequence

import torch


def synthetic_kv(
    tokens: Sequence[int],
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    salt: int = 0,
) -> torch.Tensor:
    """``[num_layers, 2, len(tokens), num_kv_heads, head_dim]`` of ``dtype`` on ``device``."""
    t = torch.as_tensor(list(tokens), dtype=torch.int64, device=device)
    n = t.numel()
    position = torch.arange(n, dtype=torch.int64, device=device)
    per_token = (t * 2654435761 + position * 40503 + salt * 97) % 65521  # [T]
    layer = torch.arange(num_layers, device=device).view(-1, 1, 1, 1, 1) * 7919
    kv = torch.arange(2, device=device).view(1, -1, 1, 1, 1) * 104729
    head = torch.arange(num_kv_heads, device=device).view(1, 1, 1, -1, 1) * 613
    dim = torch.arange(head_dim, device=device).view(1, 1, 1, 1, -1) * 31
    grid = (per_token.view(1, 1, -1, 1, 1) + layer + kv + head + dim) % 256
    return ((grid - 128).to(torch.float32) / 16).to(dtype)


def synthetic_for(config, tokens: Sequence[int], device: str | torch.device = "cpu", salt: int = 0) -> torch.Tensor:
    """Synthetic KV in the model shape and dtype a config sets."""
    return synthetic_kv(
        tokens, config.num_layers, config.num_kv_heads, config.head_dim,
        getattr(torch, config.kv_dtype), device, salt,
    )
