"""Engine KV-event streams into a real controller process over loopback: stores, removes,
clears, namespaces, tiers, data-parallel ranks, and the faults (lost messages, a replay ring
that moved on, a restarted engine, a restarted controller, garbage) with the answers checked
after each. The publisher (tests/kv_event_publisher.py) speaks vLLM's protocol; the real
engines' encodings are in test_kv_event_fixtures.py and tests/interop."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import pytest

from kv_event_publisher import CLEARED, Publisher, free_port, removed, stored

BS = 16
A = list(range(1000, 1064))  # 4 blocks
B = A[:32] + list(range(2000, 2032))  # shares A's first 2 blocks


class Setup:
    def __init__(self, controller, *, replay=True, ring=10000, replay_topic=True, extra=None, idle_check=600.0):
        self.pub_port, self.replay_port = free_port(), free_port()
        spec = {"bind": f"tcp://127.0.0.1:{self.pub_port}"}
        if replay:
            spec["replay_endpoint"] = f"tcp://127.0.0.1:{self.replay_port}"
        spec.update(extra or {})
        self.publisher = Publisher(f"tcp://127.0.0.1:{self.pub_port}",
                                   spec.get("replay_endpoint"), ring=ring, replay_topic=replay_topic)
        self.controller = controller("--kv-events", json.dumps(spec), "--kv-events-replay-timeout", "5",
                                     "--kv-events-idle-check", str(idle_check))
        self.base = f"http://127.0.0.1:{self.controller.http_port}"

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def lookup(self, tokens, detail=False, **names) -> dict:
        status, body = self.post("/lookup?detail=1" if detail else "/lookup", {"tokens": tokens, **names})
        assert status == 200, body
        return body

    def answer(self, tokens, **names) -> dict:
        return self.lookup(tokens, **names)["layout_info"]

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            return r.read().decode()

    def until(self, check, what: str, timeout: float = 30.0):
        """Wait for a property to hold (the stream is asynchronous); fail naming it."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                kv_metrics = [line for line in self.metrics().splitlines() if "kv_event" in line]
                raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(kv_metrics)
                                     + "\ncontroller log:\n" + self.controller.log()[-4000:])
            time.sleep(0.05)

    def connected(self) -> None:
        """PUB drops what it sends before the connection is up: publish empty batches until
        the controller has applied every one, so each test starts from a known point. Twice:
        the first catch-up may come from the controller's start-up replay alone, before the
        live connection is up (a message published then is lost until the next one shows the
        gap); the second needs a message that came live, so the connection is up."""
        def caught_up() -> bool:
            n = self.publisher.publish([]) + 1
            return f'lmcache_kv_event_next_seq{{instance="pod-a"}} {n:.1f}\n' in self.metrics()
        self.until(caught_up, "the publisher to connect")
        self.until(caught_up, "a live message after the start-up replay")

    def close(self):
        self.publisher.close()


@pytest.fixture
def setup(controller):
    made = []

    def make(**kw) -> Setup:
        s = Setup(controller, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_stores_removes_and_clears_answer_exactly(setup):
    s = setup()
    s.connected()
    a = stored(A, BS)
    s.publisher.publish([a])
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 64]}, "A stored")
    assert s.answer(A[:40]) == {"pod-a": ["GPU", 32]}  # only whole blocks
    assert s.answer(list(range(5000, 5064))) == {}
    b = stored(B[32:], BS, parent=a["block_hashes"][1])
    s.publisher.publish([b, stored(A[:16], BS)])  # a duplicate store changes nothing
    s.until(lambda: s.answer(B) == {"pod-a": ["GPU", 64]}, "B stored after its parent")
    s.publisher.publish([removed(a["block_hashes"][3:4])])
    s.publisher.publish([removed(a["block_hashes"][2:3])])
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 32]}, "A's tail removed")
    assert s.answer(B) == {"pod-a": ["GPU", 64]}
    s.publisher.publish([CLEARED, stored(list(range(3000, 3032)), BS)])
    s.until(lambda: s.answer(B) == {}, "the clear")
    assert s.answer(list(range(3000, 3032))) == {"pod-a": ["GPU", 32]}


def test_namespaces_tiers_and_ranks(setup):
    s = setup()
    s.connected()
    a = stored(A, BS)
    s.publisher.publish([a, stored(B, BS, lora_name="sql-lora"), stored(B, BS, extra_keys=[["salt-1"], None, None, None])])
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 64]}, "A stored")
    assert s.answer(A, model="tiny") == {"pod-a": ["GPU", 64]}
    assert s.answer(A, model="another-model") == {}
    assert s.answer(A, model=None) == s.answer(A)  # null is the same as not naming a model
    assert s.answer(B) == {"pod-a": ["GPU", 32]}  # the base model shares only A's blocks
    assert s.answer(B, lora_name="sql-lora") == {"pod-a": ["GPU", 64]}
    assert s.answer(B, cache_salt="salt-1") == {"pod-a": ["GPU", 64]}
    # the offload tier holds A's first blocks too; the GPU drops them: CPU answers
    s.publisher.publish([stored(A[:32], BS, medium="CPU"), removed(a["block_hashes"][3:4]),
                         removed(a["block_hashes"][2:3]), removed(a["block_hashes"][1:2])])
    s.until(lambda: s.answer(A) == {"pod-a": ["LocalCPUBackend", 32]}, "GPU eviction: the longer CPU match answers")
    detail = s.lookup(A, detail=True)["detail"]["pod-a"]["locations"]
    assert detail == {"GPU": 16, "LocalCPUBackend": 32}
    # an unknown medium is its own location, never a GPU hit
    s.publisher.publish([stored(list(range(7000, 7016)), BS, medium="XPU_HBM")])
    s.until(lambda: s.answer(list(range(7000, 7016))) == {"pod-a": ["XPU_HBM", 16]}, "unknown medium")
    # another data-parallel rank is another engine
    s.publisher.publish([stored(list(range(8000, 8032)), BS)], rank=1)
    s.until(lambda: s.answer(list(range(8000, 8032))) == {"pod-a-dp1": ["GPU", 32]}, "rank 1's own instance")


def test_lost_messages_come_back_by_replay(setup):
    s = setup()
    s.connected()
    a = stored(A, BS)
    s.publisher.publish([a], send=False)  # lost on the wire
    s.publisher.publish([removed(a["block_hashes"][3:4])], send=False)
    s.publisher.publish([stored(B[32:], BS, parent=a["block_hashes"][1])])
    s.until(lambda: s.answer(B) == {"pod-a": ["GPU", 64]}, "the replayed parent and the live child")
    assert s.answer(A) == {"pod-a": ["GPU", 48]}
    assert s.publisher.replays >= 1
    # (the connection's own losses may add gaps, and a replay still running from them may take
    # the live message in without calling it one: what is certain is a replay)
    assert re.search(r'lmcache_kv_event_replays_total\{instance="pod-a"\} [1-9]', s.metrics())
    assert "stale" not in s.lookup(A, detail=True)
    with urllib.request.urlopen(s.base + "/dashboard.json", timeout=10) as r:
        (pub,) = json.loads(r.read())["kv_event_publishers"]
    assert (pub["instance_id"], pub["stale"], pub["next_seq"]) == ("pod-a", None, s.publisher.seq)
    assert type(pub["gaps"]) is int and pub["replays"] >= 1


def test_a_lost_last_message_comes_back_by_the_idle_check(setup):
    s = setup(idle_check=0.5)
    s.connected()
    s.publisher.publish([stored(A, BS)], send=False)  # nothing follows it
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 64]}, "the idle check's replay")
    assert "stale" not in s.lookup(A, detail=True)


def test_replay_ring_moved_on_marks_the_engine_stale(setup):
    s = setup(ring=2)
    s.connected()
    s.publisher.publish([CLEARED, stored(A, BS)])  # exact from here, whatever the connection lost
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 64]} and "stale" not in s.lookup(A, detail=True), "A stored")
    for k in range(3):  # three lost batches; the ring keeps two
        s.publisher.publish([stored(list(range(9000 + 16 * k, 9016 + 16 * k)), BS)], send=False)
    s.publisher.publish([stored(B, BS)])
    s.until(lambda: s.answer(B) == {"pod-a": ["GPU", 64]}, "the live batch after the gap")
    # A's tail may still be held or not: the engine is stale and forgets rather than guess
    assert s.answer(A) == {"pod-a": ["GPU", 32]}  # only what the ring kept and the live batch say (B)
    assert s.answer(list(range(9032, 9048))) == {"pod-a": ["GPU", 16]}  # the last lost one was still in the ring
    assert s.answer(list(range(9000, 9016))) == {}
    assert "no longer buffered" in s.lookup(A, detail=True)["stale"]["pod-a"]
    assert 'lmcache_kv_event_publishers{stale="true"} 1.0\n' in s.metrics()
    s.publisher.publish([CLEARED, stored(A, BS)])  # a clear makes the picture exact again
    s.until(lambda: "stale" not in s.lookup(A, detail=True), "exact after a clear")
    assert s.answer(A) == {"pod-a": ["GPU", 64]}
    assert s.answer(B) == {"pod-a": ["GPU", 32]}


def test_no_replay_endpoint_means_stale_at_once(setup):
    s = setup(replay=False)
    s.connected()
    s.publisher.publish([CLEARED, stored(A, BS)])
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 64]} and "stale" not in s.lookup(A, detail=True), "A stored")
    s.publisher.publish([stored(B, BS)], send=False)
    s.publisher.publish([stored(list(range(6000, 6016)), BS)])
    s.until(lambda: s.answer(list(range(6000, 6016))) == {"pod-a": ["GPU", 16]}, "the live batch")
    assert s.answer(A) == {}
    assert "no replay endpoint" in s.lookup(A, detail=True)["stale"]["pod-a"]


def test_engine_restart_drops_its_holdings(setup):
    s = setup()
    s.connected()
    s.publisher.publish([stored(A, BS)])
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 64]}, "A stored")
    s.publisher.restart()
    s.publisher.publish([stored(B[32:], BS)])
    s.until(lambda: s.answer(B[32:]) == {"pod-a": ["GPU", 32]}, "the new engine's first store")
    assert s.answer(A) == {}
    assert 'lmcache_kv_event_restarts_total{instance="pod-a"} 1.0\n' in s.metrics()


def test_an_unseen_engine_restart_is_caught_by_the_replay(setup):
    """The engine restarts and publishes past the old sequence while every message is lost: the
    next one looks like a gap, but the replay shows the last applied number carrying another
    message, so the old holdings go and the new stream is applied from 0."""
    s = setup()
    s.connected()
    s.publisher.publish([stored(A, BS)])
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 64]}, "A stored")
    old_seq = s.publisher.seq
    s.publisher.restart()
    s.publisher.publish([stored(B, BS)], send=False)
    while s.publisher.seq <= old_seq + 1:
        s.publisher.publish([], send=False)
    s.publisher.publish([stored(list(range(6000, 6032)), BS)])
    s.until(lambda: s.answer(list(range(6000, 6032))) == {"pod-a": ["GPU", 32]}, "the new engine's live batch")
    assert s.answer(B) == {"pod-a": ["GPU", 64]}  # from the new engine's replay
    assert s.answer(A) == {"pod-a": ["GPU", 32]}  # only B's share of A: the old engine's blocks are gone
    assert 'lmcache_kv_event_restarts_total{instance="pod-a"} 1.0\n' in s.metrics()
    assert "stale" not in s.lookup(A, detail=True)


def test_controller_restart_rebuilds_from_the_replay_ring(setup):
    # vLLM before 0.26 replays without the topic: the subscription names the engine
    s = setup(replay_topic=False, extra={"instance_id": "pod-a", "model": "tiny"})
    s.connected()
    a = stored(A, BS)
    s.publisher.publish([a, stored(B[32:], BS, parent=a["block_hashes"][1])])
    s.publisher.publish([removed(a["block_hashes"][3:4])])
    queries = [A, B, A[:20], list(range(5000, 5100))]
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 48]}, "the stream applied")
    before = [s.answer(q) for q in queries]
    s.controller.kill()
    s.controller.start()
    s.base = f"http://127.0.0.1:{s.controller.http_port}"
    s.until(lambda: [s.answer(q) for q in queries] == before, "identical answers after the restart")
    s.publisher.publish([removed(a["block_hashes"][2:3])])  # and the live stream goes on from there
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 32]}, "live after the restart")


def test_garbage_and_oversized_frames_change_nothing(setup):
    s = setup()
    s.connected()
    s.publisher.publish([stored(A, BS)])
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 64]}, "A stored")
    pub = s.publisher.pub
    pub.send_multipart([b"kv@pod-a@tiny", b"\x00" * 3])  # two frames
    pub.send_multipart([b"kv@pod-a@tiny", (999).to_bytes(8, "big"), b"\xc1garbage"])  # not msgpack
    pub.send_multipart([b"kv@pod-a@tiny", (999).to_bytes(8, "big"), b"\x93\xa1x\x90\x00"])  # not a batch
    pub.send_multipart([b"kv@pod-a@tiny", (999).to_bytes(8, "big"), b"\x00" * (65 * 1024 * 1024)])  # too large
    # a tag that is not a string, and nesting past the decoder's recursion limit: each used to
    # end the socket's loop
    s.publisher.publish([[[1], 2, 3]])
    pub.send_multipart([b"kv@pod-a@tiny", (999).to_bytes(8, "big"), b"\x91" * 200_000])
    bad_events = [["BlockStored", "not-a-list"], {"type": "BlockStored", "block_hashes": [1.5]},
                  {"type": "FutureEvent", "x": 1}, {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"},
                  {**stored(list(range(4000, 4016)), BS), "brand_new_field": [1, 2]}]
    s.publisher.publish(bad_events)
    s.until(lambda: s.answer(list(range(4000, 4016))) == {"pod-a": ["GPU", 16]},
            "the good event of the batch (an unknown field is ignored)")
    assert s.answer(A) == {"pod-a": ["GPU", 64]}
    metrics = s.metrics()
    for reason in ("bad_frames", "decode_errors", "malformed_events", "unknown_event_types", "unknown_removes",
                   "unknown_fields"):
        assert f'lmcache_kv_events_skipped_total{{reason="{reason}"}}' in metrics, reason


def test_events_instances_take_no_commands(setup):
    s = setup()
    s.connected()
    s.publisher.publish([stored(A, BS)])
    s.until(lambda: s.answer(A) == {"pod-a": ["GPU", 64]}, "A stored")
    status, body = s.post("/clear", {"instance_id": "pod-a", "location": "GPU"})
    assert status >= 400 and "KV-cache events" in body["error"]
    assert s.answer(A) == {"pod-a": ["GPU", 64]}
    status, body = s.post("/lookup", {"tokens": A, "model": 3})
    assert status == 400 and "model" in body["error"]
    status, body = s.post("/lookup", {"tokens": [-1], "model": "tiny"})
    assert status == 400


def test_subscription_settings_are_checked():
    from lmcache_rs.controller.settings import parse_kv_events

    for bad in ('{"topic": "x"}', '{"bind": "tcp://127.0.0.1:1", "connect": "tcp://127.0.0.1:2"}',
                '{"bind": "127.0.0.1:1"}', '{"bind": "tcp://127.0.0.1:1", "colour": "red"}', "[1]", "{"):
        with pytest.raises(ValueError):
            parse_kv_events(bad)
    assert parse_kv_events('[{"connect": "tcp://127.0.0.1:1"}, {"bind": "ipc:///tmp/x"}]')[1] == {"bind": "ipc:///tmp/x"}


def test_connect_mode_follows_an_engine_that_binds(controller):
    """The engine binds (``tcp://*:5557`` in vLLM) and the controller connects to it."""
    port, replay = free_port(), free_port()
    publisher = Publisher(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}", connect=False)
    try:
        publisher.publish([stored(A, BS)])  # before the controller exists: only the replay has it
        c = controller("--kv-events", json.dumps({"connect": f"tcp://127.0.0.1:{port}", "instance_id": "engine-1",
                                                  "replay_endpoint": f"tcp://127.0.0.1:{replay}"}))
        body = json.dumps({"tokens": A}).encode()
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{c.http_port}/lookup", data=body)) as r:
                if json.loads(r.read())["layout_info"] == {"engine-1": ["GPU", 64]}:
                    break
            assert time.monotonic() < deadline, "the start-up replay did not rebuild the engine's blocks"
            time.sleep(0.05)
    finally:
        publisher.close()

