"""Run the fuzz targets and report what each did.

    python fuzz/run.py                       # every target, 1,000,000 inputs each (make fuzz)
    python fuzz/run.py --runs 3000 http      # a smoke run of one target
    python fuzz/run.py --replay              # the checked-in corpus through the Python targets, no fuzzer

Python targets (fuzz/fuzz_*.py) run under atheris (libFuzzer for Python); the Rust targets
(fuzz/rust/, the index's parsers of untrusted bytes) under cargo fuzz with AddressSanitizer,
when ``cargo fuzz`` and a nightly toolchain are installed (otherwise they are skipped, and
said so). Each target starts from its checked-in corpus (fuzz/corpus/<target>/, read only)
and writes the inputs it finds to target/fuzz/<target>/corpus/; a crash is saved under
target/fuzz/<target>/ with the libFuzzer prefix ``crash-`` (those of earlier runs are moved to
target/fuzz/<target>/earlier/ first). Exit status 1 when any target
crashed. A JSON summary goes to target/fuzz/summary.json and one line per target to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "target" / "fuzz"
TARGETS = {
    "http": "fuzz_http.py",
    "lookup_json": "fuzz_lookup_json.py",
    "monitor": "fuzz_monitor.py",
    "frames": "fuzz_frames.py",
    "kv_events": "fuzz_kv_events.py",
}
RUST_TARGETS = ["lookup_body", "http_fast", "snapshot_load", "kv_payload", "lmcache_push"]
MAX_LEN = {"http": 4096, "lookup_json": 4096, "monitor": 4096, "frames": 2048, "kv_events": 2048, "lookup_body": 4096,
           "http_fast": 4096, "snapshot_load": 4096, "kv_payload": 4096,
           "lmcache_push": 4096}


def cargo_fuzz_available() -> bool:
    try:
        return subprocess.run(["cargo", "+nightly", "fuzz", "--version"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def corpus_files(target: str) -> list[Path]:
    return sorted(p for p in (HERE / "corpus" / target).glob("*") if p.is_file())


def replay(targets: list[str]) -> int:
    """Every corpus file through its target in this process (no atheris needed)."""
    sys.path.insert(0, str(HERE))
    failed = 0
    for name in targets:
        module = importlib.import_module(TARGETS[name][:-3])
        files = corpus_files(name)
        t0 = time.monotonic()
        for path in files:
            try:
                module.test_one_input(path.read_bytes())
            except Exception as exc:  # report every failing file, then fail
                failed += 1
                print(f"{name}: {path.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"{name}: replayed {len(files)} corpus inputs in {time.monotonic() - t0:.2f} s")
    return 1 if failed else 0


def fuzz(name: str, runs: int, max_total_time: int, seed: int | None, jobs_env: dict) -> dict:
    work = OUT / name
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    # each run reports its own findings: those of earlier runs are kept under earlier/
    for old in [*work.glob("crash-*"), *work.glob("timeout-*")]:
        (work / "earlier").mkdir(exist_ok=True)
        old.rename(work / "earlier" / old.name)
    flags = [f"-runs={runs}", f"-max_len={MAX_LEN[name]}", "-timeout=20", "-rss_limit_mb=4096",
             f"-artifact_prefix={work}/", "-print_final_stats=1"]
    if name in RUST_TARGETS:
        cmd = ["cargo", "+nightly", "fuzz", "run", "--fuzz-dir", str(HERE / "rust"), "-O", name,
               str(corpus), str(HERE / "corpus" / name), "--", *flags]
        jobs_env = dict(jobs_env, FUZZ_SCRATCH=str(work))
    else:
        cmd = [sys.executable, str(HERE / TARGETS[name]), str(corpus), str(HERE / "corpus" / name), *flags]
    if max_total_time:
        cmd.append(f"-max_total_time={max_total_time}")
    if seed is not None:
        cmd.append(f"-seed={seed}")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=jobs_env)
    elapsed = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    (work / "log.txt").write_text(log)
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    executed = int(stats.get("number_of_executed_units", 0))
    crashes = sorted(p.name for p in work.glob("crash-*")) + sorted(p.name for p in work.glob("timeout-*"))
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    result = {
        "target": name, "inputs": executed, "seconds": round(elapsed, 1),
        "inputs_per_s": round(executed / elapsed) if elapsed else 0,
        "exit": proc.returncode, "crash_files": crashes,
        "coverage_edges": int(cov[-1][0]) if cov else None, "features": int(cov[-1][1]) if cov else None,
        "corpus_units": int(cov[-1][2]) if cov else None, "peak_rss_mb": int(stats.get("peak_rss_mb", 0)) or None,
        "checked_in_corpus": len(corpus_files(name)),
    }
    if proc.returncode != 0:
        tail = "\n".join(log.splitlines()[-40:])
        print(f"--- {name} failed (exit {proc.returncode}); last lines:\n{tail}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", help=f"any of {', '.join(list(TARGETS) + RUST_TARGETS)} (default: all)")
    p.add_argument("--runs", type=int, default=1_000_000, help="inputs per target (default %(default)s)")
    p.add_argument("--max-total-time", type=int, default=0, help="seconds per target, 0 = no limit")
    p.add_argument("--seed", type=int, help="libFuzzer seed (default: random)")
    p.add_argument("--replay", action="store_true", help="replay the checked-in corpus only, without atheris")
    args = p.parse_args(argv)
    targets = args.targets or list(TARGETS) + RUST_TARGETS
    unknown = [t for t in targets if t not in TARGETS and t not in RUST_TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; choose from {list(TARGETS) + RUST_TARGETS}")
    if args.replay:
        return replay([t for t in targets if t in TARGETS])
    if any(t in RUST_TARGETS for t in targets) and not cargo_fuzz_available():
        skipped = [t for t in targets if t in RUST_TARGETS]
        print(f"skipping {skipped}: needs `cargo install cargo-fuzz` and `rustup toolchain install nightly`",
              file=sys.stderr)
        targets = [t for t in targets if t not in RUST_TARGETS]
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: .venv/bin/pip install atheris", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    results = []
    for name in targets:
        print(f"fuzzing {name}: {args.runs} inputs ...", file=sys.stderr, flush=True)
        r = fuzz(name, args.runs, args.max_total_time, args.seed, env)
        results.append(r)
        print(f"{name:12} inputs={r['inputs']:>9} time={r['seconds']:>7}s rate={r['inputs_per_s']:>6}/s "
              f"cov={r['coverage_edges']} ft={r['features']} corpus={r['corpus_units']} "
              f"rss={r['peak_rss_mb']}MB crashes={len(r['crash_files'])} exit={r['exit']}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    bad = [r for r in results if r["exit"] != 0 or r["crash_files"] or r["inputs"] < args.runs and not args.max_total_time]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
