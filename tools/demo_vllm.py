"""The spec's "Lookup the KV cache" flow on a real vLLM server with lmcache_rs alone
(``make demo-vllm``).

vLLM (CPU build, from .venv-interop) serves a tiny random Llama with a byte-level tokenizer
built here, with lmcache_rs's KV connector configured by the spec's example.yaml; then
``lmcache_controller`` starts as the spec starts it. The spec's three requests follow: a
completion, ``/tokenize`` of the prompt, and ``/lookup`` of those tokens at the controller.
Exits 0 when the lookup answers ``"lmcache_default_instance": ["LocalCPUBackend", <every
prompt token>]``: vLLM computed the prompt's KV, the connector stored it in the instance's
CPU pool and reported it.

The model is not the spec's Llama-3.1-8B (no hub access, no GPU here); everything else is as
the spec writes it, on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from lmcache_rs.demo import EXAMPLE_YAML, HOST, HTTP_PORT, INSTANCE, MONITOR_PORT, port_free, post_lookup, program, \
    say, show, stop

REPO = Path(__file__).resolve().parent.parent
INTEROP_PY = REPO / ".venv-interop" / "bin" / "python"
VLLM_PORT = 8000
MODEL = "tiny-llama"
PROMPT = "Explain the significance of KV cache in language models."
CONNECTOR = {"kv_connector": "LMCacheRsConnector", "kv_connector_module_path": "lmcache_rs.vllm",
             "kv_role": "kv_both"}


def http(method: str, path: str, body: dict | None = None, port: int = VLLM_PORT, timeout: float = 120) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    return json.loads(text) if text else {}


def curl(path: str, body: dict, port: int = VLLM_PORT) -> str:
    return (f"curl -X POST http://{HOST}:{port}{path} -H \"Content-Type: application/json\" \\\n"
            f"  -d '{json.dumps(body)}'")


def build_model(workdir: Path) -> Path:
    model = workdir / MODEL
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import vllm_engine as e; "
            "e.build_tiny_llama(Path(sys.argv[2])); e.build_byte_tokenizer(Path(sys.argv[2]))")
    subprocess.run([str(INTEROP_PY), "-c", code, str(REPO / "tools"), str(model)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return model


def wait_for_vllm(proc: subprocess.Popen, log_path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{VLLM_PORT}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM did not come up in {timeout:.0f} s; see {log_path}")


def main() -> int:
    busy = [p for p in (VLLM_PORT, HTTP_PORT, MONITOR_PORT, 8001, 8200) if not port_free(p)]
    if busy:
        say(f"demo-vllm: port(s) {busy} are in use; stop whatever holds them")
        return 1
    workdir = Path(tempfile.gettempdir()) / f"lmcache_rs-demo-vllm-{os.getuid()}"
    workdir.mkdir(exist_ok=True)
    model = build_model(workdir)
    config = workdir / "example.yaml"
    config.write_text(EXAMPLE_YAML)
    say("# example.yaml, as the spec writes it:")
    say(EXAMPLE_YAML.rstrip())
    say()
    procs: dict[str, subprocess.Popen] = {}
    env = {**os.environ, "PYTHONHASHSEED": "123", "LMCACHE_CONFIG_FILE": str(config),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "PYTHONPATH": str(REPO / "python")}
    serve = [str(INTEROP_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--served-model-name", MODEL, "--max-model-len", "1024", "--port", str(VLLM_PORT), "--host", HOST,
             "--dtype", "float32", "--enforce-eager", "--block-size", "32",
             "--kv-transfer-config", json.dumps(CONNECTOR)]
    say("# 1. vLLM (CPU) on port 8000 with lmcache_rs's connector (the wheel's `vllm` script cannot start;")
    say("#    `python -m vllm.entrypoints.openai.api_server` is `vllm serve`)")
    say(f"$ {show(serve, {'PYTHONHASHSEED': '123', 'LMCACHE_CONFIG_FILE': 'example.yaml'})} &")
    ok = False
    vllm_log = workdir / "vllm.log"
    try:
        with open(vllm_log, "wb") as log:
            procs["vllm"] = subprocess.Popen(serve, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        ctl_env = {k: v for k, v in env.items() if k not in ("LMCACHE_CONFIG_FILE", "PYTHONPATH")}
        ctl = program("lmcache_controller", "lmcache_rs.controller") + [
            "--host", HOST, "--port", str(HTTP_PORT), "--monitor-port", str(MONITOR_PORT)]
        say()
        say("# 2. the controller: HTTP on 9000, the monitor (where the connector reports) on 9001")
        say(f"$ {show(ctl, {'PYTHONHASHSEED': '123'})} &")
        procs["controller"] = subprocess.Popen(ctl, env=ctl_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_vllm(procs["vllm"], vllm_log)
        say()
        completion_body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10}
        say("# 3. a completion")
        say("$ " + curl("/v1/completions", completion_body))
        completion = http("POST", "/v1/completions", completion_body)
        say(json.dumps({k: completion[k] for k in ("model", "usage") if k in completion}))
        say()
        tokenize_body = {"model": MODEL, "prompt": PROMPT}
        say("# 4. the prompt's tokens")
        say("$ " + curl("/tokenize", tokenize_body))
        tokenized = http("POST", "/tokenize", tokenize_body)
        say(json.dumps(tokenized))
        tokens = tokenized["tokens"]
        say()
        body = json.dumps({"tokens": tokens})
        say("# 5. the spec's lookup (the connector reports within a heartbeat; retried for up to 30 s)")
        deadline = time.monotonic() + 30
        while True:
            argv, answer = post_lookup(body)
            try:
                layout = json.loads(answer).get("layout_info", {})
            except ValueError:
                layout = {}
            ok = layout.get(INSTANCE) == ["LocalCPUBackend", len(tokens)]
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        say("$ " + " ".join(argv))
        say(answer.strip())
        say()
        say(f"# expected: {INSTANCE} -> (LocalCPUBackend, {len(tokens)}): "
            + ("yes" if ok else f"NO (vLLM's log: {vllm_log})"))
    finally:
        for name in ("controller", "vllm"):
            if name in procs:
                stop(name, procs[name])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
