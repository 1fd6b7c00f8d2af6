"""Time to first token on a real vLLM (CPU) with lmcache_rs's KV connector, beside recompute
and vLLM's own CPU-offloading connectors, in one run.

    .venv/bin/python benchmarks/vllm_connector.py [--quick] [--models tiny,prefill8] [--timing]

For each model and each connector, one engine (tools/vllm_engine.py, from .venv-interop) runs
``--prompts`` distinct prompts of ``--prompt-tokens`` tokens, each twice: a *miss* (vLLM's
prefix cache empty, the connector's store without the prompt: full prefill, plus the
connector's lookup and save) and, after ``reset_prefix_cache``, a *repeat* (whatever the
connector can serve is loaded instead of computed). Each request generates one token, so its
time is the time to first token. A repeat that loaded tokens must give exactly the output of
vLLM's own prefix cache for the prompt (``repeat_output_identical``). Medians are reported; the first request of each engine
(a warm-up of its own, other tokens) is not counted.

Models (random weights, built locally): ``tiny`` is the tests' 2-layer Llama (hidden 128);
``prefill8`` makes prefill expensive: 8 layers, hidden 512, 8 heads, 2 KV heads, 4,096-token
prompts. Connectors: ``none`` (recompute), ``noop`` (benchmarks/anchors/noop_connector.py, which does
nothing: vLLM's own cost of running a connector), ``lmcache_rs`` (LMCacheRsConnector, CPU pool of
2 GB, chunk 256), and vLLM's ``OffloadingConnector`` and ``SimpleCPUOffloadConnector`` (a
connector that fails to start on this CPU build is reported with its error).

The connector's cost on a miss is ``miss(lmcache_rs) / miss(none) - 1``; the target is at
most 5 %. A small model's step is too short and too noisy for that ratio to resolve a few
percent, so ``--timing`` also times lmcache_rs's own calls inside vLLM
(lmcache_rs/vllm/timing.py): per phase, the calls and their median and mean microseconds
(``connector_timing``). ``--paired N`` measures a miss's save end to end inside one engine
instead: N pairs of misses, one request of each with LMCache's ``lmcache.skip_save``.
Results: benchmarks/results/vllm_connector.json (``--paired``: vllm_connector_paired.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
INTEROP_PY = REPO / ".venv-interop" / "bin" / "python"
ENGINE = REPO / "tools" / "vllm_engine.py"
RESULTS = REPO / "benchmarks" / "results" / "vllm_connector.json"

sys.path.insert(0, str(REPO / "python"))
from lmcache_rs.vllm.timing import summary as timing_summary  # noqa: E402

MODELS = {
    "tiny": {"shape": None, "prompt_tokens": 960, "max_model_len": 1024},
    "prefill8": {"shape": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                           "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 8192},
                 "prompt_tokens": 4096, "max_model_len": 4200},
}
CONNECTORS = {
    "none": None,
    "noop": {"kv_connector": "NoopConnector", "kv_connector_module_path": "noop_connector", "kv_role": "kv_both"},
    "lmcache_rs": {"kv_connector": "LMCacheRsConnector", "kv_connector_module_path": "lmcache_rs.vllm",
                   "kv_role": "kv_both"},
    "OffloadingConnector": {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                            "kv_connector_extra_config": {"cpu_bytes_to_use": 2 * 1024**3}},
    "SimpleCPUOffloadConnector": {"kv_connector": "SimpleCPUOffloadConnector", "kv_role": "kv_both",
                                  "kv_connector_extra_config": {"num_cpu_blocks": 1024}},
}


class Engine:
    def __init__(self, workdir: Path, model: str, connector: str, timing: Optional[Path] = None):
        spec = MODELS[model]
        config = {"model_dir": str(workdir / model), "model_shape": spec["shape"], "max_tokens": 1,
                  "max_model_len": spec["max_model_len"], "num_blocks": 2 * spec["max_model_len"] // 32 + 8,
                  "max_num_seqs": 1}
        if CONNECTORS[connector] is not None:
            config["kv_transfer_config"] = CONNECTORS[connector]
        settings = workdir / "lmcache.yaml"
        settings.write_text("chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 2\n"
                            "lmcache_instance_id: bench\n")
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'python'}{os.pathsep}{REPO / 'benchmarks' / 'anchors'}",
               "LMCACHE_CONFIG_FILE": str(settings)}
        if timing is not None:
            env["LMCACHE_RS_CONNECTOR_TIMING"] = str(timing)
        self.log_path = workdir / f"{model}-{connector}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(INTEROP_PY), str(ENGINE), json.dumps(config)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, cwd=workdir, env=env)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.close()
            lines = self.log_path.read_text(errors="replace").splitlines()
            cause = [ln for ln in lines if "failed with error" in ln] or [ln for ln in lines if "Error" in ln]
            raise RuntimeError(cause[-1].split("] ")[-1].strip() if cause else f"engine exited {self.proc.returncode}")

    def call(self, **cmd) -> dict:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        try:
            self.call(op="stop")
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_one(workdir: Path, model: str, connector: str, prompts: list[list[int]], timing: bool = False) -> dict:
    started = time.monotonic()
    timing_path = workdir / f"{model}-{connector}.timing" if timing else None
    if timing_path is not None and timing_path.exists():
        timing_path.unlink()
    try:
        engine = Engine(workdir, model, connector, timing_path)
    except RuntimeError as exc:
        return {"error": str(exc)[:300]}
    try:
        engine.call(op="generate", tokens=[7] * 64)  # warm-up
        miss, repeat, cached, same, same_tokens = [], [], [], True, True
        for tokens in prompts:
            engine.call(op="reset")
            first = engine.call(op="generate", tokens=tokens)
            # vLLM's own prefix cache: the output a load must reproduce exactly (the last prompt
            # token computed alone can differ in the last float bits from a full prefill)
            local = engine.call(op="generate", tokens=tokens)
            engine.call(op="reset")
            second = engine.call(op="generate", tokens=tokens)
            miss.append(first["seconds"])
            repeat.append(second["seconds"])
            cached.append(second["cached"])
            reference = local if second["cached"] else first
            same &= second["tokens"] == reference["tokens"] and second["logprobs"] == reference["logprobs"]
            same_tokens &= second["tokens"] == first["tokens"]
    finally:
        engine.close()
    result = {"miss_s": statistics.median(miss), "repeat_s": statistics.median(repeat),
              "repeat_cached_tokens": statistics.median(cached), "repeat_output_identical": same,
              "repeat_tokens_as_computed": same_tokens,
              "miss_all_s": miss, "repeat_all_s": repeat, "engine_seconds": time.monotonic() - started}
    if timing_path is not None and timing_path.exists():
        result["connector_timing"] = timing_summary(str(timing_path))
    return result


def run_paired(workdir: Path, model: str, pairs: int, timing: bool) -> dict:
    """The cost of a miss's save inside one engine, where two engines' noise does not enter:
    pairs of fresh prompts, one request of each pair with ``lmcache.skip_save`` (looked up,
    nothing saved) and one without (looked up and saved), in alternating order. The lookup is
    in both; its cost is in the timed calls."""
    timing_path = workdir / f"{model}-paired.timing" if timing else None
    if timing_path is not None and timing_path.exists():
        timing_path.unlink()
    engine = Engine(workdir, model, "lmcache_rs", timing_path)
    rng = random.Random(9)
    n = MODELS[model]["prompt_tokens"]
    saving, skipping = [], []
    try:
        engine.call(op="generate", tokens=[7] * 64)  # warm-up
        for i in range(pairs):
            for save in ((True, False) if i % 2 else (False, True)):
                engine.call(op="reset")
                tokens = [rng.randrange(3, 500) for _ in range(n)]
                params = {} if save else {"lmcache.skip_save": True}
                out = engine.call(op="generate", tokens=tokens, kv_transfer_params=params)
                assert out["cached"] == 0, out
                (saving if save else skipping).append(out["seconds"])
    finally:
        engine.close()
    diffs = [a - b for a, b in zip(saving, skipping)]
    # a 95 % interval for the median difference: the median of pairs resampled with replacement
    resample = random.Random(1)
    medians = sorted(statistics.median(resample.choices(diffs, k=len(diffs))) for _ in range(5000))
    step = statistics.median(skipping)
    result = {"pairs": pairs, "miss_saving_s": statistics.median(saving), "miss_skipping_s": step,
              "save_cost_median_s": statistics.median(diffs),
              "save_cost_share": statistics.median(diffs) / step,
              "save_cost_share_ci95": [medians[124] / step, medians[4874] / step],
              "saving_all_s": saving, "skipping_all_s": skipping}
    if timing_path is not None and timing_path.exists():
        result["connector_timing"] = timing_summary(str(timing_path))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,prefill8")
    parser.add_argument("--connectors", default=",".join(CONNECTORS))
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 prompts, the tiny model only")
    parser.add_argument("--timing", action="store_true",
                        help="time lmcache_rs's own calls inside vLLM (LMCACHE_RS_CONNECTOR_TIMING)")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="instead: N pairs of misses in one lmcache_rs engine, saving and not saving")
    args = parser.parse_args()
    models = ["tiny"] if args.quick else args.models.split(",")
    count = 2 if args.quick else args.prompts
    if not INTEROP_PY.exists():
        print(f"{INTEROP_PY} is missing: make interop-venv", file=sys.stderr)
        return 2
    workdir = Path(tempfile.gettempdir()) / f"lmcache_rs-bench-vllm-{os.getuid()}"
    workdir.mkdir(exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                     "command": " ".join([Path(sys.executable).name, *sys.argv]), "models": {}}
    if args.paired:
        for model in models:
            res = results["models"][model] = {"paired": run_paired(workdir, model, args.paired, args.timing)}
            print(model, json.dumps({k: v for k, v in res["paired"].items() if not k.endswith("all_s")}), flush=True)
        RESULTS.with_name("vllm_connector_paired.json").write_text(json.dumps(results, indent=1) + "\n")
        return 0
    for model in models:
        rng = random.Random(5)
        n = MODELS[model]["prompt_tokens"]
        prompts = [[rng.randrange(3, 500) for _ in range(n)] for _ in range(count)]
        per = results["models"][model] = {"prompt_tokens": n}
        for connector in args.connectors.split(","):
            per[connector] = run_one(workdir, model, connector, prompts, args.timing and connector == "lmcache_rs")
            print(model, connector, json.dumps({k: v for k, v in per[connector].items() if not k.endswith("all_s")}),
                  flush=True)
        if "miss_s" in per.get("none", {}) and "miss_s" in per.get("lmcache_rs", {}):
            per["lmcache_rs_miss_overhead"] = per["lmcache_rs"]["miss_s"] / per["none"]["miss_s"] - 1
            per["lmcache_rs_repeat_speedup"] = per["none"]["repeat_s"] / per["lmcache_rs"]["repeat_s"]
            print(model, "overhead on a miss %+.1f%%, repeat %.1fx faster than recompute"
                  % (100 * per["lmcache_rs_miss_overhead"], per["lmcache_rs_repeat_speedup"]), flush=True)
        if "miss_s" in per.get("noop", {}) and "miss_s" in per.get("lmcache_rs", {}):
            per["lmcache_rs_miss_over_noop"] = per["lmcache_rs"]["miss_s"] / per["noop"]["miss_s"] - 1
            print(model, "miss against a connector that does nothing %+.1f%%" % (100 * per["lmcache_rs_miss_over_noop"]),
                  flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
