"""The paged-KV layouts of the vLLM connector (lmcache_rs.vllm.layout), without vLLM: each
layout is built here from its definition, element by element, and gather/scatter must move
exactly the (token, head, dim) elements the definition says, for random block tables."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_rs.vllm import layout

NB, N, H, D, L = 6, 4, 2, 3, 2


def reference_kv(num_tokens: int, seed: int) -> torch.Tensor:
    """Distinct values for every (layer, k/v, token, head, dim)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((L, 2, num_tokens, H, D), generator=g)


def place(kind: str, kv: torch.Tensor, blocks: list[int], offsets: list[int]) -> list[torch.Tensor]:
    """Layer tensors of layout ``kind`` holding ``kv``'s tokens at (blocks, offsets), written
    one element at a time from the layout's definition (zeros elsewhere). The ``cpu`` layout is
    also checked against vLLM's own cache writer (tests/interop/test_vllm_cpu_layout.py)."""
    layers = []
    for layer in range(L):
        if kind == "cpu":
            t = torch.zeros((NB, H, N, 2 * D))
            flat = t.view(NB, H, 2 * N * D)
        elif kind == "split":
            t = torch.zeros((NB, H, N, 2 * D))
        elif kind == "kv_first":
            t = torch.zeros((2, NB, N, H, D))
        else:
            t = torch.zeros((NB, 2, N, H, D))
        for i, (b, n) in enumerate(zip(blocks, offsets)):
            for h in range(H):
                for d in range(D):
                    k, v = kv[layer, 0, i, h, d], kv[layer, 1, i, h, d]
                    if kind == "cpu":
                        flat[b, h, d * N + n] = k  # K transposed: [D][N]
                        flat[b, h, N * D + n * D + d] = v  # V row-major after it
                    elif kind == "split":  # vLLM 0.32 CUDA: transpose(1, 2).split(D, -1)
                        t[b, h, n, d], t[b, h, n, D + d] = k, v
                    elif kind == "kv_first":
                        t[0, b, n, h, d], t[1, b, n, h, d] = k, v
                    else:
                        t[b, 0, n, h, d], t[b, 1, n, h, d] = k, v
        layers.append(t)
    return layers


@pytest.mark.parametrize("kind", layout.KINDS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_gather_and_scatter_follow_the_layout_definition(kind, data):
    num_tokens = data.draw(st.integers(1, NB * N))
    table = data.draw(st.permutations(range(NB)))
    start = data.draw(st.integers(0, num_tokens - 1))
    blocks_list = [table[p // N] for p in range(start, num_tokens)]
    offsets_list = [p % N for p in range(start, num_tokens)]
    kv = reference_kv(num_tokens - start, data.draw(st.integers(0, 2**16)))
    tensors = place(kind, kv, blocks_list, offsets_list)
    names = {f"model.layers.{i}.self_attn.attn": t for i, t in enumerate(tensors)}
    got_kind, got_names, views = layout.describe(names, N, H, D, hint=kind)
    assert got_kind == kind and got_names == list(names)
    blocks, offsets = layout.slot_indices(table, N, start, num_tokens, torch.device("cpu"))
    assert blocks.tolist() == blocks_list and offsets.tolist() == offsets_list
    assert torch.equal(layout.gather(views, blocks, offsets), kv)
    # scatter into empty caches of the same layout gives back the element-wise placement
    empty = {name: torch.zeros_like(t) for name, t in names.items()}
    _, _, empty_views = layout.describe(empty, N, H, D, hint=kind)
    layout.scatter(empty_views, blocks, offsets, kv)
    for name, t in names.items():
        assert torch.equal(empty[name], t), name


@pytest.mark.parametrize("kind", layout.KINDS)
@pytest.mark.parametrize(("begin", "end"), [(N, 4 * N), (0, 3 * N + 1), (N, N + 2), (1, 2 * N + 3), (2, 3)])
def test_a_run_of_tokens_copied_layer_by_layer_equals_its_tokens_gathered_one_by_one(kind, begin, end):
    table = [4, 0, 5, 2]
    kv = reference_kv(len(table) * N, seed=3)
    tensors = place(kind, kv, [table[p // N] for p in range(len(table) * N)], [p % N for p in range(len(table) * N)])
    _, _, views = layout.describe({f"l{i}": t for i, t in enumerate(tensors)}, N, H, D, hint=kind)
    run = layout.token_run(table, N, begin, end, torch.device("cpu"))
    for layer, layer_views in enumerate(views):
        out = torch.empty((2, end - begin, H, D))
        layout.copy_run(layer_views, run, out)
        assert torch.equal(out, kv[layer, :, begin:end]), kind


def test_scatter_touches_only_the_given_tokens():
    tensors = {"l0": torch.full((NB, H, N, 2 * D), 7.0), "l1": torch.full((NB, H, N, 2 * D), 7.0)}
    _, _, views = layout.describe(tensors, N, H, D)
    blocks, offsets = layout.slot_indices([3, 1], N, 2, 5, torch.device("cpu"))  # block 3 off 2,3; block 1 off 0
    layout.scatter(views, blocks, offsets, torch.zeros((2, 2, 3, H, D)))
    changed = sum(int((t != 7.0).sum()) for t in tensors.values())
    assert changed == 2 * 2 * 3 * H * D  # layers x (k, v) x tokens x heads x dims, nothing else


def test_shapes_that_fit_no_layout_are_refused_with_the_shape_named():
    with pytest.raises(layout.UnsupportedLayout, match=r"\[6, 4, 64\]"):
        layout.describe({"mla": torch.zeros((6, 4, 64))}, N, H, D)
    with pytest.raises(layout.UnsupportedLayout, match="no KV-cache layers"):
        layout.describe({}, N, H, D)
    mixed = {"a": torch.zeros((NB, H, N, 2 * D)), "b": torch.zeros((2, NB, N, H, D))}
    with pytest.raises(layout.UnsupportedLayout, match="different layouts"):
        layout.describe(mixed, N, H, D)


def test_two_block_caches_follow_the_hint():
    t = torch.zeros((2, 2, N, H, D))
    assert layout.detect_kind(t, N, H, D) == "kv_first"
    assert layout.detect_kind(t, N, H, D, hint="blocks_first") == "blocks_first"


def test_views_share_storage_with_a_cache_that_is_a_view_into_a_larger_buffer():
    # vLLM's CPU backend gives each layer a view into one buffer; layer 1 starts mid-buffer
    buffer = torch.zeros(2 * NB * H * N * 2 * D)
    layer1 = buffer[NB * H * N * 2 * D:].view(NB, H, N, 2 * D)
    kv = reference_kv(3, seed=random.randrange(1000))[:1]
    views = [layout.layer_views(layer1, "cpu")]
    blocks, offsets = layout.slot_indices([5], N, 0, 3, torch.device("cpu"))
    layout.scatter(views, blocks, offsets, kv)
    assert torch.equal(buffer[: NB * H * N * 2 * D], torch.zeros(NB * H * N * 2 * D))
    assert torch.equal(layout.gather(views, blocks, offsets), kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("begin", "end"), [(0, 4 * N), (N, 3 * N + 1), (0, 1), (2 * N, 2 * N + N - 1)])
def test_packed_cpu_layers_copy_out_natively_as_the_strided_views_read_them(dtype, begin, end):
    # a packed `cpu` layer goes through copy_cpu_blocks (rust/kv_copy.rs); what it writes must
    # be what the strided K and V views say, for 2- and 4-byte elements and partial last blocks
    table = [4, 0, 5, 2]
    kv = reference_kv(len(table) * N, seed=11).to(dtype)
    tensors = place("cpu", kv.float(), [table[p // N] for p in range(len(table) * N)],
                    [p % N for p in range(len(table) * N)])
    tensors = [t.to(dtype) for t in tensors]
    _, _, views = layout.describe({f"l{i}": t for i, t in enumerate(tensors)}, N, H, D, hint="cpu")
    run = layout.token_run(table, N, begin, end, torch.device("cpu"))
    for layer, layer_views in enumerate(views):
        assert layer_views.packed is not None
        out = torch.full((2, end - begin, H, D), -1.0, dtype=dtype)
        layout.copy_run(layer_views, run, out)
        assert torch.equal(out, kv[layer, :, begin:end]), (dtype, layer)


def test_unpacked_cpu_layers_keep_the_torch_copy():
    table = [1, 3]
    kv = reference_kv(2 * N, seed=5)
    (layer0, _) = place("cpu", kv, [table[p // N] for p in range(2 * N)], [p % N for p in range(2 * N)])
    # every other block of a larger tensor: not contiguous, so no packed view
    spaced = torch.zeros((2 * NB, H, N, 2 * D))
    spaced[::2] = layer0
    views = layout.layer_views(spaced[::2], "cpu")
    assert views.packed is None
    run = layout.token_run(table, N, 0, 2 * N, torch.device("cpu"))
    out = torch.empty((2, 2 * N, H, D))
    layout.copy_run(views, run, out)
    assert torch.equal(out, kv[0])


def test_copy_cpu_blocks_refuses_what_does_not_fit():
    from lmcache_rs import InvalidArgumentError, copy_cpu_blocks

    src = torch.zeros((NB, H, N, 2 * D)).reshape(-1).numpy()
    dst = torch.zeros((2, N, H, D)).reshape(-1).numpy()
    with pytest.raises(InvalidArgumentError, match="kv_first"):
        copy_cpu_blocks(src, dst, [0], N, H, N, D, H * N * 2 * D, kv_first=1)
    copy_cpu_blocks(src, dst, [1], N, H, N, D, H * N * 2 * D, to_cache=True)
    args = (1, H, N, D, H * N * 2 * D)
    copy_cpu_blocks(src, dst, [NB - 1], N, *args[1:])
    with pytest.raises(InvalidArgumentError, match="outside the cache"):
        copy_cpu_blocks(src, dst, [NB], N, *args[1:])
    with pytest.raises(InvalidArgumentError, match="token-major side holds"):
        copy_cpu_blocks(src, dst[:-1], [0], N, *args[1:])
    with pytest.raises(InvalidArgumentError, match="overlap"):
        copy_cpu_blocks(src, src[: dst.size], [1], N, *args[1:])
    with pytest.raises(InvalidArgumentError, match="items of 2 or 4 bytes"):
        copy_cpu_blocks(src, torch.zeros(dst.size, dtype=torch.float64).numpy(), [0], N, *args[1:])
    with pytest.raises(InvalidArgumentError, match="one item size"):
        copy_cpu_blocks(src, torch.zeros(2 * dst.size, dtype=torch.float16).numpy(), [0], N, *args[1:])
    readonly = dst.copy()
    readonly.setflags(write=False)
    with pytest.raises(InvalidArgumentError, match="writable"):
        copy_cpu_blocks(src, readonly, [0], N, *args[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_load_into_packed_cpu_layers_writes_what_scatter_writes(dtype, data):
    # copy_run_in (copy_cpu_blocks into the cache) against scatter, element for element, for
    # runs starting at a block's start, from any first token of the retrieved KV
    num_tokens = data.draw(st.integers(1, NB * N))
    start = data.draw(st.integers(0, (num_tokens - 1) // N)) * N
    table = data.draw(st.permutations(range(NB)))
    kv = reference_kv(num_tokens, data.draw(st.integers(0, 2**16))).to(dtype)
    fast = {f"l{i}": torch.randn((NB, H, N, 2 * D)).to(dtype) for i in range(L)}
    slow = {name: t.clone() for name, t in fast.items()}
    _, _, fast_views = layout.describe(fast, N, H, D)
    _, _, slow_views = layout.describe(slow, N, H, D)
    run = layout.token_run(table, N, start, num_tokens, torch.device("cpu"))
    assert layout.copy_run_in(fast_views, run, kv, start)
    blocks, offsets = layout.slot_indices(table, N, start, num_tokens, torch.device("cpu"))
    layout.scatter(slow_views, blocks, offsets, kv[:, :, start:num_tokens])
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name


def test_a_load_copy_run_in_declines_what_it_does_not_take():
    tensors = {"l0": torch.zeros((NB, H, N, 2 * D))}
    _, _, views = layout.describe(tensors, N, H, D)
    kv = torch.ones((1, 2, 2 * N, H, D))
    mid = layout.token_run([0, 1, 2], N, 1, 2 * N, torch.device("cpu"))
    assert not layout.copy_run_in(views, mid, kv, 1)  # starts mid-block
    whole = layout.token_run([0, 1], N, 0, 2 * N, torch.device("cpu"))
    assert not layout.copy_run_in(views, whole, kv.double(), 0)  # another dtype
    assert not layout.copy_run_in(views, whole, kv.transpose(2, 3).contiguous().transpose(2, 3), 0)
    assert int(tensors["l0"].count_nonzero()) == 0  # nothing written by any of them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_cpu_blocks_both_ways_on_shapes_with_whole_simd_tiles(dtype):
    # block 32, head_dim 64 (as vLLM's CPU caches): the 4-byte path transposes in 4x4 tiles
    nb, h, n, d = 5, 2, 32, 64
    from lmcache_rs import copy_cpu_blocks

    cache = torch.randn((nb, h, n, 2 * d)).to(dtype)
    views = layout.layer_views(cache, "cpu")
    table, tokens = [3, 0, 4], 2 * n + 5
    blocks, offsets = layout.slot_indices(table, n, 0, tokens, torch.device("cpu"))
    want = torch.stack([views.key[blocks, offsets], views.value[blocks, offsets]])
    out = torch.empty((2, tokens, h, d), dtype=dtype)
    copy_cpu_blocks(layout.bytes_view(cache), layout.bytes_view(out), table, tokens, h, n, d, h * n * 2 * d)
    assert torch.equal(out, want)
    # and back, into a cache of zeros: exactly those tokens, nothing else
    empty = torch.zeros_like(cache)
    copy_cpu_blocks(layout.bytes_view(empty), layout.bytes_view(out), table, tokens, h, n, d, h * n * 2 * d,
                    to_cache=True)
    back = layout.layer_views(empty, "cpu")
    assert torch.equal(back.key[blocks, offsets], want[0]) and torch.equal(back.value[blocks, offsets], want[1])
    written = 2 * tokens * h * d
    assert int(empty.count_nonzero()) == int(want.count_nonzero()) and int(want.count_nonzero()) > written * 0.99


def test_copy_cpu_blocks_refuses_buffers_it_cannot_take():
    import numpy as np

    from lmcache_rs import InvalidArgumentError, copy_cpu_blocks

    args = ([0], N, H, N, D, H * N * 2 * D)
    cache = np.zeros(NB * H * N * 2 * D, dtype=np.float32)
    kv = np.zeros(2 * N * H * D, dtype=np.float32)
    readonly = cache.copy()
    readonly.setflags(write=False)
    with pytest.raises(InvalidArgumentError, match="cache must be writable"):
        copy_cpu_blocks(readonly, kv, *args, to_cache=True)
    copy_cpu_blocks(readonly, kv, *args)  # reading a read-only cache is fine
    misaligned = np.frombuffer(bytearray(kv.nbytes + 1), dtype=np.float32, offset=1)
    with pytest.raises(InvalidArgumentError, match="aligned"):
        copy_cpu_blocks(cache, misaligned, *args)
    with pytest.raises(InvalidArgumentError, match="items of 2 or 4 bytes"):
        copy_cpu_blocks(cache, np.zeros(3, dtype="V0"), *args)
    with pytest.raises(InvalidArgumentError, match="items of 2 or 4 bytes"):
        copy_cpu_blocks(cache.view(np.uint8), kv.view(np.uint8), *args)
    # two halves of one array, side by side but not overlapping, are accepted
    both = np.zeros(cache.size + kv.size, dtype=np.float32)
    copy_cpu_blocks(both[: cache.size], both[cache.size:], *args)
