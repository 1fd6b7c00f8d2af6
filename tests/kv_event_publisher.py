"""An engine-side KV-event publisher for fault-injection tests: vLLM's wire protocol (PUB of
``[topic, seq, payload]`` plus a replay ROUTER over a ring of recent batches), with knobs
to lose messages, restart the sequence and shrink the ring. The real engines' streams are
covered by the fixture corpus (tests/fixtures/kv_events) and tests/interop."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import msgspec
import zmq

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def free_port() -> int:
    """A loopback TCP port free now, for a publisher's or a controller's socket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_hashes(tokens: list[int], block_size: int, parent: int | None = None, salt: str = "") -> list[int]:
    """Engine block hashes as vLLM folds them: the low 64 bits of a sha256 chain (LoRA and
    salt change them, as in vLLM)."""
    out = []
    prev = parent.to_bytes(8, "big") if parent is not None else salt.encode()
    for i in range(0, len(tokens) - len(tokens) % block_size, block_size):
        digest = hashlib.sha256(prev + repr(tokens[i:i + block_size]).encode()).digest()
        out.append(int.from_bytes(digest[-8:], "big"))
        prev = digest[-8:]
    return out


def stored(tokens: list[int], block_size: int, parent: int | None = None, medium: str | None = "GPU",
           **extra) -> dict:
    hashes = engine_hashes(tokens, block_size, parent, salt=repr((extra.get("lora_name"), extra.get("extra_keys"))))
    n = len(hashes) * block_size
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens[:n],
            "block_size": block_size, "lora_id": None, "medium": medium, "lora_name": extra.pop("lora_name", None),
            **extra}


def removed(hashes: list[int], medium: str | None = "GPU") -> dict:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


CLEARED = {"type": "AllBlocksCleared"}


class Publisher:
    """Publishes batches from a background thread's sockets (the test calls are thread-safe
    through a lock). ``replay_topic`` chooses vLLM ≥ 0.26's reply shape."""

    def __init__(self, pub_endpoint: str, replay_endpoint: str | None, topic: str = "kv@pod-a@tiny",
                 ring: int = 10000, replay_topic: bool = True, connect: bool = True):
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        (self.pub.connect if connect else self.pub.bind)(pub_endpoint)
        self.replay = None
        if replay_endpoint:
            self.replay = self.ctx.socket(zmq.ROUTER)
            self.replay.setsockopt(zmq.LINGER, 0)
            self.replay.bind(replay_endpoint)
        self.topic = topic.encode()
        self.ring_size = ring
        self.replay_topic = replay_topic
        self.seq = 0
        self.ring: list[tuple[int, bytes]] = []
        self.lock = threading.Lock()
        self.replays = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_replays, daemon=True)
        self._thread.start()

    def publish(self, events: list, rank: int = 0, send: bool = True) -> int:
        """One batch; ``send=False`` loses it on the wire (it stays in the replay ring)."""
        payload = msgspec.msgpack.encode([time.time(), events, rank])
        with self.lock:
            seq = self.seq
            self.seq += 1
            self.ring.append((seq, payload))
            del self.ring[:-self.ring_size]
        if send:
            self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def restart(self) -> None:
        """As a restarted engine: the sequence starts over and the ring is empty."""
        with self.lock:
            self.seq = 0
            self.ring = []

    def _serve_replays(self) -> None:
        if self.replay is None:
            return
        poller = zmq.Poller()
        poller.register(self.replay, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            client, _, start = self.replay.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            self.replays += 1
            with self.lock:
                ring = list(self.ring)
            for seq, payload in ring:
                if seq >= start_seq:
                    head = [client, b"", self.topic] if self.replay_topic else [client, b""]
                    self.replay.send_multipart(head + [seq.to_bytes(8, "big"), payload])
            tail = [client, b"", b"", END_SEQ, b""] if self.replay_topic else [client, b"", END_SEQ, b""]
            self.replay.send_multipart(tail)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pub.close(0)
        if self.replay is not None:
            self.replay.close(0)
        self.ctx.term()
