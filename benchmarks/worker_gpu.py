"""Worker store (GPU -> CPU pool) and retrieve (CPU pool -> GPU) bandwidth, beside raw copies.

    python benchmarks/worker_gpu.py                 # Llama-3.1-8B KV shape on the GPU
    python benchmarks/worker_gpu.py --smoke         # tiny shape, CPU (or GPU if present): a check

Shape (default): 32 layers, 8 KV heads, head_dim 128, bf16, 256-token chunks = 128 KiB per
token, 32 MiB per chunk; prompts of 4k, 8k, 16k and 32k tokens. For every prompt length, in
the same process and on the same pinned pool:

* ``raw``: one ``copy_`` of the whole prompt's bytes between a contiguous GPU buffer and the
  pinned pool (the anchor: what the link gives a plain large copy);
* ``naive``: per chunk, ``slot.copy_(kv[:, :, s:e])`` on the current stream (torch makes the
  chunk contiguous on the GPU, then copies), one sync at the end;
* ``worker``: ``KVStore.store`` / ``KVStore.retrieve(tokens, out=buffer)`` into a buffer
  allocated once, as the raw copy has (two side streams, double-buffered staging, one sync per
  call; see python/lmcache_rs/worker/transfer.py), metadata included;
* ``new``: ``KVStore.retrieve(tokens, device=...)``, which allocates its result every call
  (on CPU that means fresh pages each time).

Each figure is the median of ``--repeats`` timed runs after a warm-up. Store runs start
from an empty pool (cleared between runs, untimed). Retrieve results are checked bit for bit
against the stored tensor once per prompt length. Goal: worker >= 80 % of raw.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))  # run from a checkout without installing
HASHES = "native"
try:
    import lmcache_rs  # noqa: F401
except ImportError:
    # The native module is not built on this machine (e.g. a GPU box without Rust). Chunk
    # hashing is not what is measured here, so use the same algorithm in Python: the
    # chained seeded xxh3-64 of tests/reference_model.py (identical keys).
    import struct
    import types

    import xxhash

    def _chunk_hashes(tokens, chunk_size=256, seed=0):
        out, prev = [], None
        for start in range(0, len(tokens), chunk_size):
            part = tokens[start : start + chunk_size]
            data = struct.pack(f"<{len(part)}I", *part)
            prev = xxhash.xxh3_64_intdigest(data if prev is None else struct.pack("<Q", prev) + data, seed=seed)
            out.append(prev)
        return out

    stub = types.ModuleType("lmcache_rs")
    stub.__path__ = [str(ROOT / "python" / "lmcache_rs")]
    stub.chunk_hashes = _chunk_hashes
    sys.modules["lmcache_rs"] = stub
    HASHES = "python fallback (native module not built)"

from lmcache_rs.config import GB, config_from_dict  # noqa: E402
from lmcache_rs.worker import KVStore  # noqa: E402

LLAMA = dict(num_layers=32, num_kv_heads=8, head_dim=128, kv_dtype="bfloat16", chunk_size=256)
TINY = dict(num_layers=2, num_kv_heads=2, head_dim=16, kv_dtype="float16", chunk_size=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape and prompts; runs on CPU")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tokens", type=int, nargs="+", help="prompt lengths (default 4096 8192 16384 32768)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 7; smoke 2)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def timed(fn, device: torch.device, repeats: int, setup=None) -> float:
    """Median seconds of fn() (after one warm-up), synchronising the device around each run."""
    samples = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = TINY if args.smoke else LLAMA
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("worker_gpu: CUDA is not available; use --smoke or --device cpu", file=sys.stderr)
        return 2
    lengths = args.tokens or ([256, 1024] if args.smoke else [4096, 8192, 16384, 32768])
    repeats = args.repeats or (2 if args.smoke else 7)
    dtype = getattr(torch, shape["kv_dtype"])
    per_token = shape["num_layers"] * 2 * shape["num_kv_heads"] * shape["head_dim"] * dtype.itemsize
    longest = max(lengths)
    chunks = math.ceil(longest / shape["chunk_size"])
    pool_bytes = (chunks + 1) * shape["chunk_size"] * per_token
    config = config_from_dict({**shape, "max_local_cpu_size": pool_bytes / GB})

    print("command:", " ".join([Path(sys.executable).name, "benchmarks/worker_gpu.py"] + (argv or sys.argv[1:])))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({card}); torch {torch.__version__}; python {platform.python_version()}; "
          f"chunk hashes: {HASHES}")
    print(
        f"shape: {shape['num_layers']} layers x {shape['num_kv_heads']} kv heads x {shape['head_dim']} "
        f"{shape['kv_dtype']}, chunk {shape['chunk_size']} tokens = {per_token * shape['chunk_size'] / 2**20:.2f} MiB; "
        f"pool {pool_bytes / 2**30:.2f} GiB; median of {repeats}"
    )
    started = time.perf_counter()
    worker = KVStore(config)  # the store alone: no services to start
    print(f"pool: {worker.cpu.num_slots} slots, {worker.cpu.pinned_how} memory, allocated in {time.perf_counter() - started:.2f} s")
    pool = worker.cpu.buffer
    rows = []
    header = (f"{'tokens':>7} {'MiB':>7} | {'raw D2H':>8} {'naive':>7} {'store':>7} {'store%':>6} | "
              f"{'raw H2D':>8} {'retrieve':>8} {'retr%':>6} {'new':>6}   (GB/s)")
    print(header)
    print("-" * len(header))
    try:
        for n in lengths:
            g = torch.Generator(device="cpu").manual_seed(n)
            tokens = torch.randint(0, 128000, (n,), generator=g).tolist()
            kv = torch.randn(
                (shape["num_layers"], 2, n, shape["num_kv_heads"], shape["head_dim"]), dtype=dtype, device=device,
                generator=torch.Generator(device=device).manual_seed(n),
            )
            nbytes = kv.numel() * kv.element_size()
            # the prompt's own bytes: an untouched CPU buffer would be read from the kernel's
            # shared zero page, faster than any real memory
            flat = kv.reshape(-1).view(torch.uint8).clone()
            host = pool[:nbytes]

            raw_d2h = timed(lambda: host.copy_(flat, non_blocking=True), device, repeats)
            raw_h2d = timed(lambda: flat.copy_(host, non_blocking=True), device, repeats)

            def naive():
                cs = shape["chunk_size"]
                for c, s in enumerate(range(0, n, cs)):
                    e = min(s + cs, n)
                    view = worker.cpu.slot_tensor(c, (e - s) * per_token, dtype,
                                                  (shape["num_layers"], 2, e - s, shape["num_kv_heads"], shape["head_dim"]))
                    view.copy_(kv[:, :, s:e], non_blocking=True)

            naive_s = timed(naive, device, repeats)
            store_s = timed(lambda: worker.store(tokens, kv), device, repeats, setup=worker.clear)
            assert worker.lookup(tokens) == n, "the pool did not take the whole prompt"
            matched, out = worker.retrieve(tokens, device=device)
            exact = matched == n and torch.equal(out, kv)
            del out
            buffer = torch.empty_like(kv)
            matched, out = worker.retrieve(tokens, out=buffer)
            exact = exact and matched == n and torch.equal(out, kv)
            del out
            retrieve_s = timed(lambda: worker.retrieve(tokens, out=buffer), device, repeats)
            retrieve_new_s = timed(lambda: worker.retrieve(tokens, device=device), device, repeats)
            row = {
                "tokens": n,
                "bytes": nbytes,
                "raw_d2h_gbps": nbytes / raw_d2h / 1e9,
                "naive_store_gbps": nbytes / naive_s / 1e9,
                "store_gbps": nbytes / store_s / 1e9,
                "raw_h2d_gbps": nbytes / raw_h2d / 1e9,
                "retrieve_gbps": nbytes / retrieve_s / 1e9,
                "retrieve_new_tensor_gbps": nbytes / retrieve_new_s / 1e9,
                "bit_exact": exact,
            }
            row["store_pct_of_raw"] = 100 * row["store_gbps"] / row["raw_d2h_gbps"]
            row["retrieve_pct_of_raw"] = 100 * row["retrieve_gbps"] / row["raw_h2d_gbps"]
            rows.append(row)
            print(
                f"{n:>7} {nbytes / 2**20:>7.1f} | {row['raw_d2h_gbps']:>8.1f} {row['naive_store_gbps']:>7.1f} "
                f"{row['store_gbps']:>7.1f} {row['store_pct_of_raw']:>5.0f}% | {row['raw_h2d_gbps']:>8.1f} "
                f"{row['retrieve_gbps']:>8.1f} {row['retrieve_pct_of_raw']:>5.0f}% {row['retrieve_new_tensor_gbps']:>6.1f}"
                + ("" if exact else "  NOT EXACT"),
                flush=True,
            )
            del kv, flat, buffer
            worker.clear()
    finally:
        worker.close()
    ok = all(r["bit_exact"] for r in rows)
    goal = all(r["store_pct_of_raw"] >= 80 and r["retrieve_pct_of_raw"] >= 80 for r in rows)
    print(f"bit exact: {'yes' if ok else 'NO'}; goal (worker >= 80% of raw, both ways): {'met' if goal else 'not met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "card": card, "shape": shape, "rows": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
