"""The spec's "Lookup the KV cache" flow with a real LMCache engine (``make demo-lmcache``).

Like ``make demo``, with LMCache's own engine (LMCache 0.5.6 standalone on CPU, from
.venv-interop) in place of our worker: it is configured by the spec's example.yaml plus the
reply URL LMCache 0.5 registers through, stores the KV cache of the spec's 12 tokens, and
reports them over LMCache's own protocol. Exits 0 when the spec's lookup answers
``"lmcache_default_instance": ["LocalCPUBackend", 12]``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lmcache_rs.demo import HOST, HTTP_PORT, INSTANCE, MONITOR_PORT, TOKENS, port_free, post_lookup, program, \
    quiet_lookup, say, show, stop

REPO = Path(__file__).resolve().parent.parent
INTEROP_PY = REPO / ".venv-interop" / "bin" / "python"
PULL, REPLY, WORKER_PORT = 8300, 8400, 8001
EXAMPLE = {  # the spec's example.yaml, with LMCache's reply socket and partial chunks kept
    "chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 5, "enable_controller": True,
    "lmcache_instance_id": INSTANCE, "controller_pull_url": f"localhost:{PULL}",
    "controller_reply_url": f"localhost:{REPLY}", "lmcache_worker_ports": [WORKER_PORT],
    "save_unfull_chunk": True,
}


def main() -> int:
    busy = [p for p in (HTTP_PORT, MONITOR_PORT, PULL, REPLY, WORKER_PORT) if not port_free(p)]
    if busy:
        say(f"demo-lmcache: port(s) {busy} are in use; stop whatever holds them")
        return 1
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    env.pop("PYTHONPATH", None)
    ctl = program("lmcache_controller", "lmcache_rs.controller") + [
        "--host", HOST, "--port", str(HTTP_PORT), "--monitor-port", str(MONITOR_PORT),
        "--monitor-ports", json.dumps({"pull": PULL, "reply": REPLY}), "--worker-host-override", "127.0.0.1"]
    say("# 1. the controller: HTTP on 9000, our workers on 9001, LMCache workers on 8300 (pull) and 8400 (reply)")
    say(f"$ {show(ctl, {'PYTHONHASHSEED': '123'})} &")
    procs = {"controller": subprocess.Popen(ctl, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)}
    ok = False
    try:
        say()
        say("# 2. LMCache's own engine (CPU), configured as the spec's example.yaml, stores the 12 tokens")
        say("# " + json.dumps(EXAMPLE))
        engine = subprocess.Popen([str(INTEROP_PY), str(REPO / "tools" / "lmcache_engine.py"), json.dumps(EXAMPLE)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env=env)
        procs["lmcache engine"] = engine
        ready = json.loads(engine.stdout.readline())
        say(f"# LMCache's NONE_HASH inside this engine: {ready['none_hash']}")
        engine.stdin.write(json.dumps({"op": "store", "tokens": TOKENS}) + "\n")
        engine.stdin.flush()
        engine.stdout.readline()
        body = json.dumps({"tokens": TOKENS})
        deadline = time.monotonic() + 60
        while not ((answer := quiet_lookup(body)) and INSTANCE in answer):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                say("demo-lmcache: the engine's report did not arrive")
                return 1
            time.sleep(0.1)
        say()
        say("# 3. the spec's lookup")
        argv, text = post_lookup(body)
        say("$ " + " ".join(shlex.quote(a) if not a.startswith("  #") else a for a in argv))
        say(text)
        ok = json.loads(text).get(INSTANCE) == ["LocalCPUBackend", len(TOKENS)]
        say()
        say("# 4. stop both")
        engine.stdin.write(json.dumps({"op": "stop"}) + "\n")
        engine.stdin.flush()
        engine.wait(timeout=30)
    finally:
        for name, proc in procs.items():
            stop(name, proc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
