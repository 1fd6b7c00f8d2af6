#!/usr/bin/env python3
"""Fuzz target ``kv_events``: engine KV-event messages into the controller's event source.

Each input is a stream of messages from one subscription (no replay socket, so gaps and
restarts take the drop-and-rebuild path) into a fresh source. The first byte chooses:

* bit 0 -- structured messages: batches (arrays and maps, with and without a rank) of
  ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events, array- and map-tagged,
  over a few prompts, with engine hashes derived from content (as engines derive them) and
  right, wrong, missing and extra fields; otherwise raw bytes cut into payloads;
* bit 1 -- sequence numbers jump and go back now and then (gaps, restarts);
* bit 2 -- structured messages get one damaged field each;
* bit 3 -- engine hashes as digest bytes instead of ints.

Checked for every input: nothing but the decoder's own error escapes; every answer the index
gives is backed by the engine-hash maps (an index never holds more than the maps say); with
content-derived hashes, the index holds exactly what the maps say; and a second source that
decodes every payload in Python (no Rust parser) ends in the same state.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from gen import Reader, value  # noqa: E402

if __name__ == "__main__":  # under the fuzzer: instrument our modules before anything imports them
    import atheris

    with atheris.instrument_imports(include=["lmcache_rs"]):
        import lmcache_rs.controller.kv_event_source  # noqa: F401

import hashlib  # noqa: E402

import msgspec  # noqa: E402

from lmcache_rs import Index  # noqa: E402
from lmcache_rs.controller.kv_event_source import KVEventSource  # noqa: E402
from lmcache_rs.controller.kv_events import EventDecoder  # noqa: E402
from lmcache_rs.controller.metrics import Metrics  # noqa: E402
from lmcache_rs.controller.registry import Registry  # noqa: E402
from lmcache_rs.controller.settings import Settings  # noqa: E402

BS = 4
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37]]
TOPICS = [b"kv@pod-a@m", b"kv@pod-b@m", b"", b"kv@@", b"\xff"]
MEDIA = ["GPU", "CPU", None, "lmcache-l1", "weird", 3]
BYTES_HASHES = [False]  # this input's hash form (an engine uses one)


def block_hash(tokens: list[int], end: int, bytes_hash: bool) -> int | bytes:
    digest = hashlib.sha256(repr(tokens[:end]).encode()).digest()
    return digest if bytes_hash else int.from_bytes(digest[-8:], "big")


def stored(r: Reader, content_hashes: bool) -> object:
    prompt = r.pick(PROMPTS)
    n = len(prompt) // BS
    first = r.below(n)
    last = first + 1 + r.below(n - first)
    as_bytes = BYTES_HASHES[0]
    hashes = [block_hash(prompt, (i + 1) * BS, as_bytes) for i in range(first, last)]
    parent = block_hash(prompt, first * BS, as_bytes) if first else None
    tokens = prompt[first * BS:last * BS]
    fields = {"block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens, "block_size": BS,
              "lora_id": None, "medium": r.pick(MEDIA), "lora_name": r.pick([None, None, "lora-1"])}
    if not content_hashes:  # damage one field
        fields[r.pick(list(fields))] = value(r)
    if r.below(4) == 0:
        fields["extra_keys"] = [r.pick([None, ["salt"], [[1, 2]], 5]) for _ in hashes]
    return tag(r, "BlockStored", fields)


def removed(r: Reader, content_hashes: bool) -> object:
    prompt = r.pick(PROMPTS)
    i = r.below(len(prompt) // BS)
    fields = {"block_hashes": [block_hash(prompt, (i + 1) * BS, BYTES_HASHES[0])], "medium": r.pick(MEDIA)}
    if not content_hashes:
        fields[r.pick(list(fields))] = value(r)
    return tag(r, "BlockRemoved", fields)


def tag(r: Reader, kind: str, fields: dict) -> object:
    if r.byte() & 1:
        return {"type": kind, **fields}
    order = ["block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
             "extra_keys"] if kind == "BlockStored" else ["block_hashes", "medium"]
    return [kind, *(fields.get(k) for k in order)]


def payloads(r: Reader, structured: bool, content_hashes: bool) -> list[bytes]:
    if not structured:
        raw = r.rest()
        out = []
        while raw:
            n = 1 + raw[0] % 64
            out.append(raw[1:1 + n])
            raw = raw[1 + n:]
        return out
    out = []
    for _ in range(1 + r.below(12)):
        events = []
        for _ in range(r.below(5)):
            kind = r.below(8)
            events.append(stored(r, content_hashes) if kind < 5 else removed(r, content_hashes) if kind < 7
                          else r.pick([{"type": "AllBlocksCleared"}, ["AllBlocksCleared"], {"type": "Nope"}]))
        shape = r.below(4)
        batch = ([1.0, events, r.below(3)] if shape == 0 else [1.0, events] if shape == 1
                 else {"ts": 1.0, "events": events} if shape == 2 else [value(r), events, value(r)])
        try:
            out.append(msgspec.msgpack.encode(batch))
        except OverflowError:  # an edge int msgpack cannot carry: no engine could send it either
            pass
    return out


def check(source: KVEventSource, exact: bool) -> None:
    implied: dict[tuple, set] = {}
    for pub in source.publishers.values():
        for namespace_number, key, locations in pub.engine.holdings().values():
            for location in locations:
                implied.setdefault((namespace_number, pub.instance_id, location), set()).add(key)
    for ns in source.namespaces.all():
        for instance_id, _worker_id, location, n in ns.index.holder_counts():
            backed = len(implied.get((ns.number, instance_id, location), ()))
            if n > backed or (exact and n != backed):
                raise harness.Finding(f"{instance_id}@{location} holds {n} chunks, the engine maps say {backed}")


def state(source: KVEventSource) -> tuple:
    return (source.counts, source.decoder.counts, {p.instance_id: p.engine.holdings() for p in source.publishers.values()},
            [(ns.describe(), sorted(ns.index.holder_counts())) for ns in source.namespaces.all()])


def new_source(native: bool) -> KVEventSource:
    metrics = Metrics()
    source = KVEventSource(Settings(kv_events=[{"bind": "inproc://fuzz"}]), Registry(Index(BS), metrics, 10.0),
                           metrics)
    source.decoder = EventDecoder(native=native)
    return source


def test_one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.byte()
    structured, jumpy = bool(mode & 1), bool(mode & 2)
    content_hashes = structured and not (mode & 4)
    BYTES_HASHES[0] = bool(mode & 8)
    source, python = new_source(True), new_source(False)
    seq = 0
    for payload in payloads(r, structured, content_hashes):
        if jumpy and r.below(4) == 0:
            seq = r.below(8)
        topic = r.pick(TOPICS)
        source.receive(0, source.subscriptions[0], topic, seq, payload)
        python.receive(0, python.subscriptions[0], topic, seq, payload)
        seq += 1
        check(source, content_hashes)
    if state(source) != state(python):
        raise harness.Finding("the Rust parser and the Python decoder left different states")


def main() -> None:
    harness.quiet_logs()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
