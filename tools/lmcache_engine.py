"""A real LMCache 0.5.x engine on CPU, driven line by line: run by the interop tests in the
interop venv (tools/interop_venv.sh), never in .venv.

LMCache's standalone starter runs a real ``LMCacheEngine`` (mock GPU connector, device cpu) with
its own controller worker, which registers with and reports to the controller named in the
config exactly as it does inside vLLM. Usage::

    python lmcache_engine.py CONFIG_JSON [--no-vllm] [--loopback]

``--no-vllm`` makes ``import vllm`` fail, as on a machine without vLLM, so LMCache derives its
NONE_HASH as 0 instead of from vLLM. ``--loopback`` makes the worker report 127.0.0.1 instead
of the host's routable IP: a controller that dials what workers report (LMCache's own has no
override) then stays on loopback. Commands on stdin, one JSON object a line, each answered
by one JSON line on stdout::

    {"op": "store", "tokens": [...]}       -> {"ok": true}
    {"op": "keys", "tokens": [...]}        -> {"keys": [...]}  (the engine's own chunk keys)
    {"op": "lookup", "tokens": [...]}      -> {"hit": n}       (tokens the engine holds)
    {"op": "none_hash"}                    -> {"none_hash": n}
    {"op": "stop"}                         -> {"ok": true}, then the process exits
"""

from __future__ import annotations

import json
import sys


class _NoVllm:
    """A meta path finder that makes vLLM look uninstalled."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"{name} is hidden (--no-vllm)")
        return None


def main() -> int:
    config = json.loads(sys.argv[1])
    if "--no-vllm" in sys.argv[2:]:
        sys.meta_path.insert(0, _NoVllm())
    import torch
    from lmcache.v1 import token_database
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.standalone.__main__ import LMCacheStandaloneStarter, parse_kvcache_shape_spec

    if "--loopback" in sys.argv[2:]:
        from lmcache.v1.cache_controller import worker

        worker.get_ip = lambda: "127.0.0.1"  # the address the worker registers with

    chunk = config.get("chunk_size", 256)
    cfg = LMCacheEngineConfig.from_dict(config)
    shape = (2, 2, chunk, 4, 16)
    metadata = LMCacheMetadata(model_name="interop-model", world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.float16, kv_shape=shape, use_mla=False,
                               role="worker")
    groups = parse_kvcache_shape_spec(f"(2,2,{chunk},4,16):float16:2")
    starter = LMCacheStandaloneStarter(cfg, metadata, groups, "cpu")
    engine = starter.start()
    print(json.dumps({"ready": True, "none_hash": token_database.NONE_HASH}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "store":
            tokens = cmd["tokens"]
            engine.store(tokens=torch.tensor(tokens), slot_mapping=torch.arange(len(tokens)))
            out: dict = {"ok": True}
        elif op == "keys":
            out = {"keys": [k for _, _, k in engine.token_database.process_tokens(cmd["tokens"], make_key=False)]}
        elif op == "lookup":
            out = {"hit": engine.lookup(tokens=cmd["tokens"])}
        elif op == "none_hash":
            out = {"none_hash": token_database.NONE_HASH}
        elif op == "stop":
            print(json.dumps({"ok": True}), flush=True)
            starter.stop()
            return 0
        else:
            out = {"error": f"unknown op {op!r}"}
        print(json.dumps(out), flush=True)
    starter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
