"""KVWorker as a library: bit-exact store/retrieve, LRU eviction, pinning, compression."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from lmcache_rs import chunk_hashes
from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.worker import KVWorker, synthetic_kv
from lmcache_rs.worker import compression

CS = 4  # tokens per chunk
SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8)


def make_config(slots: int = 64, **extra):
    per_token = SHAPE["num_layers"] * 2 * SHAPE["num_kv_heads"] * SHAPE["head_dim"] * 2
    size = slots * per_token * CS / GB
    return config_from_dict({"chunk_size": CS, "max_local_cpu_size": size, **SHAPE, **extra})


def random_kv(n: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE["num_layers"], 2, n, SHAPE["num_kv_heads"], SHAPE["head_dim"], generator=g).to(dtype)


@pytest.fixture
def worker():
    w = KVWorker(make_config())
    yield w
    w.kvstore.check()
    w.close()


def test_store_then_retrieve_is_bit_exact(worker):
    tokens = list(range(1000, 1018))  # 4 full chunks and a partial one
    kv = random_kv(len(tokens))
    assert worker.store(tokens, kv) == 18
    matched, out = worker.retrieve(tokens)
    assert matched == 18
    assert out.dtype == kv.dtype and torch.equal(out.view(torch.int16), kv.view(torch.int16))
    assert worker.lookup(tokens) == 18


def test_a_caller_writes_reserved_slots_itself_then_commits_or_cancels(worker):
    store = worker.kvstore
    tokens = list(range(2000, 2010))  # two full chunks and a partial one
    kv = random_kv(len(tokens))
    assert worker.store(tokens[:4], kv[:, :, :4]) == 4
    free = store.cpu.free_slots
    pending = store.reserve(tokens, 0)
    assert [(b, e) for b, e, _view in pending.writes] == [(4, 8), (8, 10)]  # the held chunk is not asked for
    assert store.cpu.free_slots == free - 2 and worker.lookup(tokens) == 4  # invisible until committed
    store.cancel(pending)
    assert store.cpu.free_slots == free and worker.lookup(tokens) == 4
    pending = store.reserve(tokens, 4)
    for begin, end, view in pending.writes:
        view.copy_(kv[:, :, begin:end])
    assert store.commit(pending) == 10
    assert torch.equal(worker.retrieve(tokens)[1], kv)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        store.reserve(tokens, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtypes_and_non_contiguous_input(dtype):
    tokens = list(range(9))
    base = random_kv(9, dtype).transpose(3, 4).contiguous().transpose(3, 4)  # strided view
    assert not base.is_contiguous()
    with KVWorker(make_config(kv_dtype=str(dtype).replace("torch.", ""))) as worker:
        worker.store(tokens, base)
        _, out = worker.retrieve(tokens)
        assert out.dtype == dtype and torch.equal(out, base)


def test_retrieve_into_a_callers_buffer(worker):
    tokens = list(range(2000, 2018))
    kv = random_kv(len(tokens))
    worker.store(tokens[:10], kv[:, :, :10])  # chunks 0, 1 and a partial chunk of 2 tokens
    # a buffer for the whole prompt (and more): the matched prefix is written, the rest untouched
    out = torch.full((2, 2, 24, 2, 8), 7.0, dtype=torch.float16)
    matched, view = worker.retrieve(tokens[:10], out=out)
    assert matched == 10 and view.shape == (2, 2, 10, 2, 8)
    assert view.data_ptr() == out.data_ptr() and torch.equal(view, kv[:, :, :10])
    assert torch.all(out[:, :, 10:] == 7.0)
    # the same answer as without out; a longer prompt matches the two full chunks only
    matched2, fresh = worker.retrieve(tokens[:10])
    assert matched2 == 10 and torch.equal(fresh, view)
    out.fill_(7.0)
    matched, view = worker.retrieve(tokens, out=out)
    assert matched == 8 and torch.equal(view, kv[:, :, :8]) and torch.all(out[:, :, 8:] == 7.0)
    # nothing stored: nothing written
    out.fill_(7.0)
    matched, view = worker.retrieve([5, 6, 7, 8, 9], out=out)
    assert matched == 0 and view.shape[2] == 0 and torch.all(out == 7.0)


def test_a_store_holds_one_dtype_so_what_it_reports_is_what_it_returns(worker):
    """A chunk's key says nothing of its dtype, so a store holds only its kv_dtype: every
    chunk it reports to the controller can be retrieved into a buffer of that dtype."""
    tokens = list(range(3000, 3008))
    with pytest.raises(ValueError, match="not the store's kv_dtype float16"):
        worker.store(tokens, random_kv(len(tokens), dtype=torch.bfloat16))  # same width, other dtype
    assert worker.lookup(tokens) == 0
    kv = random_kv(len(tokens), dtype=torch.float16)
    worker.store(tokens, kv)
    with pytest.raises(ValueError, match="out dtype bfloat16"):
        worker.retrieve(tokens, out=torch.zeros((2, 2, 8, 2, 8), dtype=torch.bfloat16))
    out = torch.zeros((2, 2, 8, 2, 8), dtype=torch.float16)
    assert worker.lookup(tokens) == 8 and worker.retrieve(tokens, out=out)[0] == 8 and torch.equal(out, kv)


@pytest.mark.parametrize("shape,dtype,device,message", [
    ((2, 2, 7, 2, 8), torch.float16, None, "T >= 8"),  # shorter than the prompt
    ((2, 2, 8, 3, 8), torch.float16, None, "out has shape"),  # heads
    ((3, 2, 8, 2, 8), torch.float16, None, "out has shape"),  # layers
    ((2, 2, 8, 2), torch.float16, None, "out has shape"),
    ((2, 2, 8, 2, 8), torch.int32, None, "floating-point"),
    ((2, 2, 8, 2, 8), torch.float16, "meta", "differs from out's device"),
])
def test_retrieve_refuses_a_bad_out(worker, shape, dtype, device, message):
    tokens = list(range(4000, 4008))
    worker.store(tokens, random_kv(len(tokens)))
    out = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        worker.retrieve(tokens, device=device, out=out)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        worker.retrieve(tokens, out=[[0.0]])
    assert worker.retrieve(tokens)[0] == 8  # nothing held back by the refusal

def test_float32_needs_a_float32_store(worker):
    with pytest.raises(ValueError, match="kv_dtype"):
        worker.store([1, 2, 3], random_kv(3, torch.float32))
    w32 = KVWorker(make_config(kv_dtype="float32"))
    try:
        kv = random_kv(6, torch.float32)
        w32.store(list(range(6)), kv)
        assert torch.equal(w32.retrieve(list(range(6)))[1], kv)
        with pytest.raises(ValueError, match="kv_dtype float32"):  # narrower dtypes are not converted
            w32.store(list(range(50, 56)), random_kv(6, torch.float16, seed=3))
    finally:
        w32.close()


def test_longest_prefix_and_divergence(worker):
    a = list(range(12))
    kv = random_kv(12)
    worker.store(a, kv)
    b = a[:8] + [99, 98, 97]
    matched, out = worker.retrieve(b)
    assert matched == 8 and torch.equal(out, kv[:, :, :8])
    assert worker.lookup([5] + a) == 0
    matched, out = worker.retrieve([5])
    assert matched == 0 and out.shape == (2, 2, 0, 2, 8)
    # the partial last chunk is a chunk of its own: a longer prompt does not match it
    worker.store(list(range(6)), kv[:, :, :6])
    assert worker.lookup(list(range(7))) == 4


def test_store_validates_shape(worker):
    with pytest.raises(ValueError, match="shape"):
        worker.store([1, 2, 3], random_kv(4))
    with pytest.raises(ValueError, match="floating"):
        worker.store([1], torch.zeros(2, 2, 1, 2, 8, dtype=torch.int32))
    assert worker.store([], random_kv(0)) == 0


def test_keys_are_the_shared_chunk_hashes(worker):
    tokens = list(range(7))
    worker.store(tokens, random_kv(7))
    assert set(worker.kvstore.cpu.entries) == set(chunk_hashes(tokens, CS, 0))


def test_lru_eviction_keeps_recent_and_pool_is_fixed():
    w = KVWorker(make_config(slots=8))
    try:
        prompts = [[p * 100 + i for i in range(8)] for p in range(4)]  # 2 chunks each
        buffer_ptr = w.kvstore.cpu.buffer.data_ptr()
        for p in prompts:
            assert w.store(p, random_kv(8, seed=p[0])) == 8
        assert len(w.kvstore.cpu.entries) == 8
        w.retrieve(prompts[0])  # touch prompt 0: now most recent
        new = [900 + i for i in range(8)]
        assert w.store(new, random_kv(8)) == 8
        assert w.lookup(prompts[0]) == 8  # survived
        assert w.lookup(prompts[1]) == 0  # least recently used: evicted
        assert w.lookup(new) == 8
        assert w.kvstore.cpu.buffer.data_ptr() == buffer_ptr and len(w.kvstore.cpu.entries) == 8
        w.kvstore.check()
    finally:
        w.close()


def test_pinned_chunks_are_never_evicted():
    w = KVWorker(make_config(slots=6))
    try:
        keep = list(range(8))
        kv = random_kv(8)
        w.store(keep, kv)
        assert w.pin(keep) == 2
        for p in range(10):
            w.store([1000 + p * 10 + i for i in range(8)], random_kv(8, seed=p))
        assert w.lookup(keep) == 8 and torch.equal(w.retrieve(keep)[1], kv)
        # the pool is 6 slots, 2 pinned: a 6-chunk prompt only gets a 4-chunk prefix in
        long = [5000 + i for i in range(24)]
        assert w.store(long, random_kv(24)) == 16
        assert w.unpin(keep) == 2
        assert w.store(long, random_kv(24)) == 24
        assert w.lookup(keep) == 0
        w.kvstore.check()
    finally:
        w.close()


def test_a_prompt_larger_than_the_pool_stores_a_prefix():
    w = KVWorker(make_config(slots=3))
    try:
        tokens = list(range(20))
        kv = random_kv(20)
        assert w.store(tokens, kv) == 12
        matched, out = w.retrieve(tokens)
        assert matched == 12 and torch.equal(out, kv[:, :, :12])
    finally:
        w.close()


def test_evict_and_clear(worker):
    a, b = list(range(8)), list(range(100, 108))
    worker.store(a, random_kv(8))
    worker.store(b, random_kv(8))
    worker.pin(b)
    assert worker.evict(a) == 2 and worker.lookup(a) == 0
    assert worker.evict(b) == 0 and worker.lookup(b) == 8  # pinned
    assert worker.clear("LocalCPUBackend") == 2 and worker.lookup(b) == 0
    assert not any(worker.kvstore.is_pinned(k) for k in worker.chunk_keys(b))
    with pytest.raises(ValueError, match="unknown location"):
        worker.clear("Nowhere")


def test_compression_round_trip_frees_memory(worker):
    tokens = list(range(40))
    kv = synthetic_kv(tokens, **SHAPE)
    worker.store(tokens, kv)
    free_before = worker.kvstore.cpu.free_slots
    result = worker.compress(tokens, "byteplane-zlib")
    assert result["chunks"] == 10 and result["bytes_after"] < result["bytes_before"] == 10 * worker.kvstore.slot_bytes
    assert worker.kvstore.cpu.free_slots > free_before  # the blobs share slots
    matched, out = worker.retrieve(tokens)
    assert matched == 40 and torch.equal(out, kv)
    again = worker.decompress(tokens)
    assert again["chunks"] == 10 and again["bytes_after"] == result["bytes_before"]
    assert torch.equal(worker.retrieve(tokens)[1], kv)
    assert worker.kvstore.cpu.free_slots == free_before
    with pytest.raises(ValueError, match="unknown compression method"):
        worker.compress(tokens, "magic")
    with pytest.raises(ValueError, match="LocalCPUBackend only"):
        worker.compress(tokens, None, "LocalDiskBackend")


def test_random_data_is_left_uncompressed(worker):
    tokens = list(range(8))
    kv = torch.randint(-32768, 32767, (2, 2, 8, 2, 8), dtype=torch.int16).view(torch.float16)
    worker.store(tokens, kv)
    result = worker.compress(tokens)
    assert result["chunks"] == 0
    assert torch.equal(worker.retrieve(tokens)[1].view(torch.int16), kv.view(torch.int16))


@pytest.mark.parametrize("width", [1, 2, 4])
def test_compression_codec_is_lossless(width):
    rng = random.Random(width)
    data = bytes(rng.randrange(4) for _ in range(4096 * width))
    blob = compression.compress(data, width)
    assert bytes(compression.decompress(blob, len(data))) == data
    with pytest.raises(ValueError):
        compression.decompress(blob[:-3], len(data))


def test_compressed_chunks_are_evicted_and_slots_reclaimed():
    w = KVWorker(make_config(slots=6))
    try:
        for p in range(30):
            tokens = [p * 1000 + i for i in range(8)]
            w.store(tokens, synthetic_kv(tokens, **SHAPE))
            if p % 2:
                w.compress(tokens)
            w.kvstore.check()
            assert w.lookup(tokens) == 8
        w.clear()
        assert w.kvstore.cpu.free_slots == w.kvstore.cpu.num_slots and not w.kvstore.cpu.slot_refs
    finally:
        w.close()


def test_concurrent_store_and_retrieve_stay_consistent():
    w = KVWorker(make_config(slots=16))
    errors = []
    prompts = [[p * 100 + i for i in range(12)] for p in range(12)]
    expected = {p[0]: synthetic_kv(p, **SHAPE) for p in prompts}

    def run(seed):
        rng = random.Random(seed)
        try:
            for _ in range(150):
                p = rng.choice(prompts)
                if rng.random() < 0.5:
                    w.store(p, expected[p[0]])
                else:
                    matched, out = w.retrieve(p)
                    if not torch.equal(out, expected[p[0]][:, :, :matched]):
                        errors.append("mismatch")
                if rng.random() < 0.05:
                    w.compress(p)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.kvstore.check()
    w.close()
    assert not errors


def test_pool_is_plain_memory_without_cuda(worker):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert worker.info()["pool"]["pinned"] == "plain"


def test_synthetic_kv_is_deterministic_and_prefix_stable():
    a = synthetic_kv(list(range(10)), **SHAPE)
    b = synthetic_kv(list(range(10)) + [7, 7], **SHAPE)
    assert torch.equal(a, b[:, :, :10])
    assert torch.equal(a, synthetic_kv(list(range(10)), **SHAPE))


def test_a_worker_id_outside_the_world_size_is_refused():
    with pytest.raises(ValueError, match="worker_id 2 is not a rank of world_size 2"):
        KVWorker(config_from_dict({"chunk_size": CS, "world_size": 2}), worker_id=2)


def test_a_worker_that_reports_without_a_command_port_is_refused():
    # the controller could send it no command: refused here, naming the key, not registered as port 0
    config = make_config(enable_controller=True, controller_pull_url="127.0.0.1:9")
    with pytest.raises(ValueError, match="lmcache_worker_ports is not set"):
        KVWorker(config)
    w = KVWorker(config, serve=False)
    try:
        with pytest.raises(ValueError, match="lmcache_worker_ports is not set"):
            w.start_services()
    finally:
        w.close()


def test_store_from_a_chunk_boundary_takes_only_the_new_tokens():
    w = KVWorker(make_config())
    try:
        tokens = list(range(300, 314))  # chunks [0,4) [4,8) [8,12) [12,14)
        kv = random_kv(14)
        assert w.store(tokens[:8], kv[:, :, :8]) == 8
        assert w.store(tokens, kv[:, :, 8:], start=8) == 14  # the engine's newly computed tokens
        matched, out = w.retrieve(tokens)
        assert matched == 14 and torch.equal(out, kv)
        # chunks after a prefix the store lacks are kept but count for nothing
        other = list(range(700, 710))
        assert w.store(other, random_kv(2), start=8) == 0
        assert w.lookup(other) == 0 and w.kvstore.holds(w.chunk_keys(other)[2])
        for start, message in ((3, "multiple of chunk_size"), (16, "within the 14 tokens"), (-4, "multiple")):
            with pytest.raises(ValueError, match=message):
                w.store(tokens, kv[:, :, :1], start=start)
        with pytest.raises(ValueError, match="shape"):
            w.store(tokens, kv, start=8)  # kv must cover tokens[start:] exactly
        w.kvstore.check()
    finally:
        w.close()


def test_held_chunks_survive_eviction_until_every_hold_is_released():
    w = KVWorker(make_config(slots=4))
    try:
        keep = list(range(8))  # 2 chunks
        w.store(keep, random_kv(8))
        matched, keys = w.kvstore.hold(keep + [99])  # the stored prefix, and its chunks held
        assert matched == 8 and keys == w.chunk_keys(keep)
        assert w.kvstore.hold(keep)[0] == 8  # a second hold
        w.kvstore.check()
        for p in range(4):  # 8 chunks through a 4-slot pool: only the 2 free slots turn over
            w.store([1000 + p * 10 + i for i in range(8)], random_kv(8, seed=p))
        assert w.lookup(keep) == 8
        w.kvstore.release(keys)
        w.store([5000 + i for i in range(8)], random_kv(8))
        assert w.lookup(keep) == 8  # still held once
        assert w.pin(keep) == 2 and w.unpin(keep) == 2  # an unpin does not end a hold
        w.store([6000 + i for i in range(8)], random_kv(8))
        assert w.lookup(keep) == 8
        w.kvstore.release(keys)
        w.kvstore.check()
        w.store([7000 + i for i in range(16)], random_kv(16))
        assert w.lookup(keep) == 0  # released: evictable again
        assert w.kvstore.hold(list(range(50, 60))) == (0, [])
        w.kvstore.check()
    finally:
        w.close()
