"""Index benchmark: lmcache_rs.Index beside NVIDIA Dynamo's RadixTree, same run, same tokens.

    .venv/bin/python benchmarks/index_bench.py            # both sides, then one table

The driver runs each side in its own interpreter, one after the other (never both at
once, so they do not share the 2 cores): ours in .venv, Dynamo's in .bench-venv
(``pip install ai-dynamo-runtime``; run_all.py creates it). Each side builds the same
seeded workload (benchmarks/workload.py), writes its figures as JSON, and the driver
prints the table and writes benchmarks/results/index_bench.json.

Measured per side:
- ingest: chunk admits per second, batched. Ours: Index.apply_batch over lists of
  ("admit", instance, worker, location, hashes-as-bytes) events. Dynamo: one
  RadixTree.apply_event per sequence (its batch unit: a "stored" event carrying the
  sequence's blocks, pre-serialised to the JSON bytes it takes). Best of --ingest-runs
  fresh builds; the chunk keys are computed before the clock starts on both sides.
- lookup from tokens (a Python list of ints, the same lists on both sides): a prompt
  prefix of 16 and 64 chunks that is held, and a 16-chunk prompt that misses everywhere.
  Ours: Index.lookup(tokens). Dynamo: compute_block_hash_for_seq(tokens, 256) then
  RadixTree.find_matches(hashes) - its hashing is part of its lookup.
  --rounds rounds of --iters calls per case; the round with the lowest p50 is reported.
- memory: bytes per (holder, chunk) from the RSS growth over the first build (freed heap
  is handed back to the OS first) and, for ours, from stats()["bytes"].

The machine is shared: each side waits (up to --quiet-wait s) for other work to settle, and
best-of-N filters out runs that other work slowed down; every run is in the JSON.
The answers of both sides are compared on every lookup query (instance -> matched tokens).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ANCHOR_PY,
    anon_huge_mib,
    BENCH_DIR,
    OUR_PY,
    fmt,
    latency_summary,
    loadavg,
    log,
    machine,
    publish,
    rss_bytes,
    run_side,
    set_thp,
    wait_quiet,
    table,
    write_json,
)
import workload as wlmod  # noqa: E402

TARGETS = {"lookup_speedup": 3.0, "ingest_admits_per_s": 5e6, "bytes_per_holding": 48.0}
CASES = ("depth16", "depth64", "miss")


def build_workload(args):
    log(f"building workload: ~{args.holdings:,} (holder, chunk) pairs, {args.instances} instances, seed {args.seed}")
    wl = wlmod.index_workload(seed=args.seed, holdings=args.holdings, instances=args.instances)
    return wl


def event_order(wl, seed: int) -> list[tuple[str, int, int]]:
    """(kind, sequence, instance) admits in one seeded order shared by both sides."""
    order = [("p", p, i) for p, hs in enumerate(wl.prompt_holders) for i in hs]
    order += [("f", s, i) for s, hs in enumerate(wl.filler_holders) for i in hs]
    random.Random(seed + 2).shuffle(order)
    return order


def query_picks(wl, seed: int, n: int) -> tuple[list[int], list[int]]:
    pick = random.Random(seed + 3)
    prompts = [pick.randrange(wl.prompts.shape[0]) for _ in range(n)]
    misses = [pick.randrange(wl.miss_queries.shape[0]) for _ in range(n)]
    return prompts, misses


def expected_answers(wl, seed: int, n: int, check: int) -> dict[str, list[dict[str, int]]]:
    """What an exact index must answer, from the workload's construction alone."""
    cs = wl.chunk_size
    prompts, _ = query_picks(wl, seed, n)
    out: dict[str, list[dict[str, int]]] = {"miss": [{} for _ in prompts[:check]]}
    for case, depth in (("depth16", 16), ("depth64", 64)):
        answers = []
        for p in prompts[:check]:
            ans = {wlmod.instance_name(i): depth * cs for i in wl.prompt_holders[p]}
            g = wl.prompt_groups[p]
            for q, holders in enumerate(wl.prompt_holders):
                if wl.prompt_groups[q] == g:
                    for i in holders:
                        ans.setdefault(wlmod.instance_name(i), wl.prompt_prefix_chunks * cs)
            answers.append(ans)
        out[case] = answers
    return out


def query_sets(wl, seed: int, n: int) -> dict[str, list[list[int]]]:
    cs = wl.chunk_size
    prompts, misses = query_picks(wl, seed, n)
    return {
        "depth16": [wl.prompts[p, : 16 * cs].tolist() for p in prompts],
        "depth64": [wl.prompts[p, : 64 * cs].tolist() for p in prompts],
        "miss": [wl.miss_queries[m].tolist() for m in misses],
    }


def trim_heap() -> None:
    """Give freed heap back to the OS so that the RSS growth that follows is the structure's."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def time_calls(fn, queries: list[list[int]], iters: int, warmup: int) -> list[int]:
    for k in range(warmup):
        fn(queries[k % len(queries)])
    out = []
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for k in range(iters):
            q = queries[k % len(queries)]
            t = clock()
            fn(q)
            out.append(clock() - t)
    finally:
        gc.enable()
    return out


def timed_rounds(fn, queries: list, args) -> dict:
    """--rounds rounds of --iters lookups; the round with the lowest p50 stands (the others
    were slowed by other work on the shared machine). Every round's summary is kept."""
    rounds = [latency_summary(time_calls(fn, queries, args.iters, args.warmup)) for _ in range(args.rounds)]
    best = dict(min(rounds, key=lambda r: r["p50_us"]))
    best["rounds"] = rounds
    return best


# --------------------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------------------


def side_ours(args) -> dict:
    import numpy as np

    import lmcache_rs

    set_thp(args.thp)
    wl = build_workload(args)
    cs = wl.chunk_size
    log("ours: hashing prompts with lmcache_rs.chunk_hashes")
    prompt_keys = [np.asarray(lmcache_rs.chunk_hashes(wl.prompts[p], cs, 0), dtype="<u8").tobytes()
                   for p in range(wl.prompts.shape[0])]
    filler_bytes = [wl.filler_keys[s].astype("<u8").tobytes() for s in range(wl.filler_keys.shape[0])]
    loc = wlmod.LOCATION
    events = []
    for kind, s, i in event_order(wl, args.seed):
        key_bytes = prompt_keys[s] if kind == "p" else filler_bytes[s]
        events.append(("admit", wlmod.instance_name(i), 0, loc, key_bytes))
    admits = sum(len(e[4]) // 8 for e in events)
    batches = [events[k:k + args.batch] for k in range(0, len(events), args.batch)]
    queries = query_sets(wl, args.seed, args.distinct_queries)
    expected_holdings = wl.holdings()

    def build():
        idx = lmcache_rs.Index(chunk_size=cs, seed=0)
        for i in range(wl.instances):
            idx.register_worker(wlmod.instance_name(i), 0)
        t = time.perf_counter()
        for b in batches:
            idx.apply_batch(b)
        return idx, time.perf_counter() - t

    trim_heap()
    rss0 = rss_bytes()
    log(f"ours: ingest 1/{args.ingest_runs}: {admits:,} chunk admits in batches of {args.batch} events")
    idx, dt = build()
    gc.collect()
    rss1 = rss_bytes()
    huge_mib = anon_huge_mib()
    stats = idx.stats()
    times = [dt]
    for r in range(1, args.ingest_runs):
        log(f"ours: ingest {r + 1}/{args.ingest_runs}")
        other, dt = build()
        times.append(dt)
        del other
    holdings = int(stats.get("holdings", expected_holdings))
    result = {
        "side": "ours",
        "version": getattr(lmcache_rs, "__version__", "?"),
        "admits": admits,
        "holdings": holdings,
        "expected_holdings": expected_holdings,
        "chunks": int(stats.get("chunks", -1)),
        "ingest_s": times,
        "ingest_admits_per_s": admits / min(times),
        "ingest_admits_per_s_median": admits / statistics.median(times),
        "rss_delta_bytes": rss1 - rss0,
        "bytes_per_holding_rss": (rss1 - rss0) / holdings,
        "anon_huge_mib": huge_mib,
        "stats_bytes": int(stats.get("bytes", -1)),
        "bytes_per_holding_stats": int(stats.get("bytes", -1)) / holdings,
        "stats": {k: int(v) for k, v in stats.items()},
        "lookup": {},
        "answers": {},
    }
    log(f"ours: {result['ingest_admits_per_s'] / 1e6:.2f} M admits/s, "
        f"{result['bytes_per_holding_rss']:.1f} B/holding (RSS), {result['bytes_per_holding_stats']:.1f} (stats)")

    for case in CASES:
        qs = queries[case]
        result["answers"][case] = [
            {inst: int(v[1]) for inst, v in idx.lookup(q).items()} for q in qs[: args.check]
        ]
        log(f"ours: lookup {case}: {args.rounds} rounds x {args.iters}")
        result["lookup"][case] = timed_rounds(idx.lookup, qs, args)
    # the same lookups given a read-only numpy uint32 array (read in place), for information;
    # a writable array is copied first (another thread could change it meanwhile)
    result["lookup_numpy"] = {}
    for case in CASES:
        arrs = [np.asarray(q, dtype=np.uint32) for q in queries[case]]
        for a in arrs:
            a.setflags(write=False)
        result["lookup_numpy"][case] = timed_rounds(idx.lookup, arrs, args)
    result["loadavg_end"] = loadavg()
    return result


# --------------------------------------------------------------------------------------
# Dynamo
# --------------------------------------------------------------------------------------


def side_dynamo(args) -> dict:
    from importlib.metadata import version

    from dynamo.llm import RadixTree, compute_block_hash_for_seq

    set_thp(args.thp)
    wl = build_workload(args)
    cs = wl.chunk_size
    log("dynamo: block hashes of prompts with compute_block_hash_for_seq")
    p_local = [compute_block_hash_for_seq(wl.prompts[p].tolist(), cs) for p in range(wl.prompts.shape[0])]
    pre = wl.prompt_prefix_chunks
    # external block ids: unique per tree node (shared prefix nodes share theirs)
    p_ext = [[(1 << 62) | (wl.prompt_groups[p] << 8) | c if c < pre else (1 << 61) | (p << 8) | c
              for c in range(wl.seq_chunks)] for p in range(wl.prompts.shape[0])]

    def stored_event(event_id: int, ext, local) -> bytes:
        blocks = ",".join(f'{{"block_hash":{int(b)},"tokens_hash":{int(t)}}}' for b, t in zip(ext, local))
        return (f'{{"event_id":{event_id},"data":{{"stored":{{"parent_hash":null,"blocks":[{blocks}]}}}}}}').encode()

    log("dynamo: serialising stored events")
    events: list[tuple[int, bytes]] = []
    admits = 0
    for n, (kind, s, i) in enumerate(event_order(wl, args.seed)):
        if kind == "p":
            ev = stored_event(n, p_ext[s], p_local[s])
        else:
            ev = stored_event(n, wl.filler_keys[s].tolist(), wl.filler_local[s].tolist())
        events.append((i, ev))
        admits += wl.seq_chunks
    queries = query_sets(wl, args.seed, args.distinct_queries)
    holdings = wl.holdings()

    def build():
        tree = RadixTree()
        t = time.perf_counter()
        for worker, ev in events:
            tree.apply_event(worker, ev)
        tree.find_matches([0])  # ordered after the events: the tree has applied them all
        return tree, time.perf_counter() - t

    trim_heap()
    rss0 = rss_bytes()
    log(f"dynamo: ingest 1/{args.ingest_runs}: {admits:,} chunk admits in {len(events):,} stored events")
    tree, dt = build()
    gc.collect()
    rss1 = rss_bytes()
    huge_mib = anon_huge_mib()
    times = [dt]
    for r in range(1, args.ingest_runs):
        log(f"dynamo: ingest {r + 1}/{args.ingest_runs}")
        other, dt = build()
        times.append(dt)
        del other

    def lookup(tokens):
        return tree.find_matches(compute_block_hash_for_seq(tokens, cs))

    result = {
        "side": "dynamo",
        "version": version("ai-dynamo-runtime"),
        "admits": admits,
        "holdings": holdings,
        "chunks": wl.chunks(),
        "ingest_s": times,
        "ingest_admits_per_s": admits / min(times),
        "ingest_admits_per_s_median": admits / statistics.median(times),
        "rss_delta_bytes": rss1 - rss0,
        "bytes_per_holding_rss": (rss1 - rss0) / holdings,
        "anon_huge_mib": huge_mib,
        "lookup": {},
        "answers": {},
    }
    log(f"dynamo: {result['ingest_admits_per_s'] / 1e6:.2f} M admits/s, "
        f"{result['bytes_per_holding_rss']:.1f} B/holding (RSS)")
    for case in CASES:
        qs = queries[case]
        result["answers"][case] = [
            {wlmod.instance_name(w[0] if isinstance(w, tuple) else w): int(n) * cs
             for w, n in lookup(q).scores.items() if n > 0}
            for q in qs[: args.check]
        ]
        log(f"dynamo: lookup {case}: {args.rounds} rounds x {args.iters}")
        result["lookup"][case] = timed_rounds(lookup, qs, args)
    result["loadavg_end"] = loadavg()
    return result


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------


def side_args(args) -> list[str]:
    return [
        "--holdings", str(args.holdings), "--instances", str(args.instances), "--seed", str(args.seed),
        "--iters", str(args.iters), "--warmup", str(args.warmup), "--batch", str(args.batch),
        "--ingest-runs", str(args.ingest_runs), "--rounds", str(args.rounds), "--check", str(args.check),
        "--distinct-queries", str(args.distinct_queries), "--thp", args.thp,
    ]


def ours_available() -> str | None:
    import subprocess

    if not OUR_PY.exists():
        return f"{OUR_PY} missing (run make install)"
    p = subprocess.run([str(OUR_PY), "-c", "import lmcache_rs; lmcache_rs.Index; lmcache_rs.chunk_hashes"],
                       capture_output=True, text=True)
    return None if p.returncode == 0 else p.stderr.strip().splitlines()[-1]


def report(res: dict) -> str:
    ours, dyn = res.get("ours"), res.get("dynamo")
    lines = []
    m = res["machine"]
    lines.append(f"machine: {m['nproc']} cores, {m['cpu']}, {m['ram_gib']} GiB; load average at start {m['loadavg_at_start']}")
    lines.append(f"memory: THP enabled={m['thp_enabled']} defrag={m['thp_defrag']}, page size {m['page_size']} B, "
                 f"CPU {m['cpu_vendor']} with {' '.join(m['cpu_flags']) or 'none of ' + 'sse4_2/avx2/avx512f'}; "
                 f"this run: --thp {res['args']['thp']}" + "".join(
                     f"; {side} backed {res[side]['anon_huge_mib']:.0f} MiB with huge pages after its build"
                     for side in ("ours", "dynamo") if side in res))
    w = dyn or ours
    lines.append(f"workload: {w['admits']:,} chunk admits -> {w['holdings']:,} (holder, chunk) pairs over "
                 f"{w['chunks']:,} chunks, {res['args']['instances']} instances, 256-token chunks, seed {res['args']['seed']}")
    rows = []

    def val(side, f):
        return "pending" if side is None else f(side)

    rows.append(["ingest (chunk admits/s, best)",
                 val(ours, lambda s: fmt(s["ingest_admits_per_s"], 2)),
                 val(dyn, lambda s: fmt(s["ingest_admits_per_s"], 2)),
                 val(ours and dyn, lambda _: f"{ours['ingest_admits_per_s'] / dyn['ingest_admits_per_s']:.1f}x"),
                 ">= 5 M/s"])
    for case in CASES:
        for q in ("p50_us", "p99_us"):
            rows.append([f"lookup {case} {q[:3]} (us)",
                         val(ours, lambda s: f"{s['lookup'][case][q]:.1f}"),
                         val(dyn, lambda s: f"{s['lookup'][case][q]:.1f}"),
                         val(ours and dyn, lambda _: f"{dyn['lookup'][case][q] / ours['lookup'][case][q]:.1f}x faster"),
                         ">= 3x faster"])
    rows.append(["bytes/(holder, chunk), RSS",
                 val(ours, lambda s: f"{s['bytes_per_holding_rss']:.1f}"),
                 val(dyn, lambda s: f"{s['bytes_per_holding_rss']:.1f}"), "", "<= 48"])
    rows.append(["bytes/(holder, chunk), stats()",
                 val(ours, lambda s: f"{s['bytes_per_holding_stats']:.1f}"), "n/a", "", "<= 48"])
    lines.append(table(["measure", "lmcache_rs", f"Dynamo RadixTree {dyn['version'] if dyn else ''}".strip(),
                        "ratio", "target"], rows))
    for side, qs in res.get("quiet", {}).items():
        lines.append(f"{side}: other work used " + "/".join(f"{q['cpu_busy_before'] * 100:.0f}%" for q in qs)
                     + f" of the CPUs just before its runs (waited {sum(q['waited_s'] for q in qs):.0f}s in all)")
    if ours:
        lines.append("ours, tokens as a read-only numpy uint32 array (read in place): " + ", ".join(
            f"{c} p50 {ours['lookup_numpy'][c]['p50_us']:.1f} us / p99 {ours['lookup_numpy'][c]['p99_us']:.1f} us"
            for c in CASES))
    for side, corr in res.get("correct", {}).items():
        lines.append(f"{side}: answers equal to the workload's expected answers: " + ", ".join(
            f"{c} {a[0]}/{a[1]}" for c, a in corr.items()))
    if "agreement" in res:
        lines.append("answers (instance -> matched tokens) equal on both sides: " + ", ".join(
            f"{c} {a[0]}/{a[1]}" for c, a in res["agreement"].items()))
    if "verdict" in res:
        lines.append("targets: " + "; ".join(res["verdict"]))
    if "ours_pending" in res:
        lines.append(f"ours: pending ({res['ours_pending']})")
    return "\n".join(lines)


def verdict(ours: dict, dyn: dict) -> list[str]:
    out = []
    r = ours["ingest_admits_per_s"]
    t = TARGETS["ingest_admits_per_s"]
    out.append(f"ingest {r / 1e6:.2f} M/s {'MET' if r >= t else f'MISSED by {(1 - r / t) * 100:.0f}%'}")
    for case in CASES:
        for q in ("p50_us", "p99_us"):
            sp = dyn["lookup"][case][q] / ours["lookup"][case][q]
            out.append(f"lookup {case} {q[:3]} {sp:.1f}x {'MET' if sp >= TARGETS['lookup_speedup'] else 'MISSED'}")
    limit = TARGETS["bytes_per_holding"]
    for key, label in (("bytes_per_holding_rss", "RSS"), ("bytes_per_holding_stats", "stats()")):
        b = ours[key]
        state = "MET" if b <= limit else f"MISSED by {b - limit:.1f} B"
        out.append(f"bytes/holding ({label}) {b:.1f} {state}")
    return out


def combine(passes: list[dict]) -> dict:
    """One side's figures over several passes: the best ingest rate and, per lookup case,
    the round with the lowest p50; memory and answers from the first pass (deterministic)."""
    out = dict(passes[0])
    out["passes"] = len(passes)
    out["ingest_admits_per_s"] = max(p["ingest_admits_per_s"] for p in passes)
    out["ingest_s"] = [t for p in passes for t in p["ingest_s"]]
    for key in ("lookup", "lookup_numpy"):
        if key in out:
            out[key] = {c: min((p[key][c] for p in passes), key=lambda r: r["p50_us"]) for c in CASES}
    out["per_pass"] = [{"ingest_admits_per_s": p["ingest_admits_per_s"],
                        "lookup_p50_us": {c: p["lookup"][c]["p50_us"] for c in CASES},
                        "bytes_per_holding_rss": p["bytes_per_holding_rss"],
                        "loadavg_end": p.get("loadavg_end")} for p in passes]
    return out


def driver(args) -> int:
    res: dict = {"bench": "index_bench", "args": vars(args).copy(), "machine": machine(), "targets": TARGETS}
    res["args"].pop("out", None)
    res["args"].pop("side", None)
    res["args"].pop("quiet_wait", None)
    missing = ours_available()
    if missing and not args.anchor_only:
        log(f"ours unavailable: {missing}")
    if not ANCHOR_PY.exists():
        log(f"{ANCHOR_PY} missing: run benchmarks/run_all.py --setup-only")
        return 2
    script = BENCH_DIR / "index_bench.py"
    quiet: dict[str, list] = {"ours": [], "dynamo": []}
    runs: dict[str, list] = {"ours": [], "dynamo": []}
    sides = ["dynamo"] if (missing is not None or args.anchor_only) else ["ours", "dynamo"]
    if "ours" not in sides:
        res["ours_pending"] = missing or "skipped (--anchor-only)"
    # the sides alternate, --passes times, so that a burst of other work on the shared
    # machine does not land on one side only; the best figures over the passes stand
    for n in range(args.passes):
        for side in sides:
            py = OUR_PY if side == "ours" else ANCHOR_PY
            log(f"=== pass {n + 1}/{args.passes}: {'our side (.venv)' if side == 'ours' else 'Dynamo side (.bench-venv)'} ===")
            quiet[side].append(wait_quiet(args.quiet_wait))
            runs[side].append(run_side(py, script, ["--side", side, *side_args(args)]))
    res["quiet"] = {k: v for k, v in quiet.items() if v}
    for side in sides:
        res[side] = combine(runs[side])
    wl = wlmod.index_workload(seed=args.seed, holdings=args.holdings, instances=args.instances)
    expected = expected_answers(wl, args.seed, args.distinct_queries, args.check)
    res["correct"] = {
        side: {c: [sum(a == b for a, b in zip(res[side]["answers"][c], expected[c])), len(expected[c])]
               for c in CASES}
        for side in ("ours", "dynamo") if side in res
    }
    if "ours" in res:
        res["agreement"] = {
            c: [sum(a == b for a, b in zip(res["ours"]["answers"][c], res["dynamo"]["answers"][c])),
                min(len(res["ours"]["answers"][c]), len(res["dynamo"]["answers"][c]))]
            for c in CASES
        }
        res["verdict"] = verdict(res["ours"], res["dynamo"])
    publish(res, "index_bench", report(res), args.out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["ours", "dynamo"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help="JSON result path (default benchmarks/results/index_bench.json)")
    ap.add_argument("--holdings", type=int, default=1_000_000, help="(holder, chunk) pairs to admit")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--iters", type=int, default=2000, help="timed lookups per case")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1024, help="events per apply_batch call (ours)")
    ap.add_argument("--ingest-runs", type=int, default=3, help="fresh builds timed (best reported)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --iters lookups per case (best p50 reported)")
    ap.add_argument("--check", type=int, default=256, help="queries per case compared between sides")
    ap.add_argument("--distinct-queries", type=int, default=512)
    ap.add_argument("--quiet-wait", type=float, default=45,
                    help="seconds to wait for other work on the machine to settle first (0: don't)")
    ap.add_argument("--passes", type=int, default=2, help="alternating passes over both sides (best kept)")
    ap.add_argument("--anchor-only", action="store_true", help="run only Dynamo's side")
    ap.add_argument("--thp", choices=["system", "off"], default="system",
                    help="transparent huge pages for both sides: the host's setting, or off for the "
                         "side processes (prctl), to measure a host without them (default system)")
    args = ap.parse_args()
    if args.side:
        res = side_ours(args) if args.side == "ours" else side_dynamo(args)
        res["args"] = {k: v for k, v in vars(args).items() if k not in ("out", "side")}
        write_json(args.out, res)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
