"""A slow pure-Python stand-in for ``lmcache_rs.Index`` built on the reference model.

Protocol tests that exercise the controller's Python code in-process use it so that they
do not depend on the native build; every real-process test uses the native index.
"""

from __future__ import annotations

import json

from reference_model import ReferenceIndex, chunk_hashes, chunk_lengths, tier_key

from lmcache_rs.wire import unpack_u64s


class PyIndex:
    def __init__(self, chunk_size: int = 256, seed: int = 0):
        self.ref = ReferenceIndex(chunk_size, seed)
        self.chunk_size = chunk_size
        self.seed = seed
        self.batches = 0
        self.admitted: list[tuple[str, int, str, int]] = []  # every (instance, worker, location, key) admitted

    def register_worker(self, instance_id, worker_id):
        self.ref.register_worker(instance_id, worker_id)

    def remove_worker(self, instance_id, worker_id):
        return self.ref.remove_worker(instance_id, worker_id)

    def workers(self):
        return {i: sorted(w) for i, w in self.ref.workers.items()}

    def apply_batch(self, events):
        events = list(events)
        for op, *_ in events:
            if op not in ("admit", "evict", "drop"):
                raise ValueError(f"unknown op {op!r}")
        self.batches += 1
        admitted = evicted = 0
        for op, instance_id, worker_id, location, hashes in events:
            if op == "drop":
                evicted += self.ref._drop(lambda h: h[0] == instance_id and h[1] == worker_id
                                          and (location is None or h[2] == location))
                continue
            keys = list(unpack_u64s(hashes)) if isinstance(hashes, (bytes, bytearray)) else list(hashes)
            if op == "admit":
                self.admitted += [(instance_id, worker_id, location, key) for key in keys]
                admitted += self.ref.admit(instance_id, worker_id, location, keys)
            else:
                evicted += self.ref.evict(instance_id, worker_id, location, keys)
        return admitted, evicted

    def clear(self, instance_id, location=None):
        return self.ref.clear(instance_id, location)

    def lookup(self, tokens):
        return self.ref.lookup(list(tokens))

    def lookup_detailed(self, tokens):
        tokens = list(tokens)
        hashes = chunk_hashes(tokens, self.chunk_size, self.seed)
        lengths = chunk_lengths(len(tokens), self.chunk_size)
        out = {}
        best = self.ref.lookup(tokens)
        for instance_id, live in self.ref.workers.items():
            locations = sorted({h[2] for held in self.ref.holdings.values() for h in held if h[0] == instance_id},
                               key=tier_key)
            per_loc = {}
            per_worker = {}
            for loc in locations:
                per_loc[loc] = self._prefix(hashes, lengths, lambda held: all((instance_id, w, loc) in held for w in live))
                for w in live:
                    n = self._prefix(hashes, lengths, lambda held: (instance_id, w, loc) in held)
                    per_worker.setdefault(w, {})[loc] = n
            if any(n for d in per_worker.values() for n in d.values()):
                loc, n = best.get(instance_id, (locations[0] if locations else "", 0))
                out[instance_id] = {"location": loc, "matched_prefix_length": n, "locations": per_loc,
                                    "workers": per_worker}
        return out

    def _prefix(self, hashes, lengths, pred):
        n = 0
        for h, ln in zip(hashes, lengths):
            if pred(self.ref.holdings.get(h, set())):
                n += ln
            else:
                break
        return n

    def lookup_json(self, body, event_id, detail=False):
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ValueError(f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or "tokens" not in data:
            raise ValueError('body must be a JSON object with "tokens"')
        tokens = data["tokens"]
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < 2**32 for t in tokens):
            raise ValueError("tokens must be a list of integers in [0, 2^32)")
        answer = self.ref.lookup(tokens)
        out = {"event_id": event_id, "layout_info": {k: list(v) for k, v in answer.items()}}
        out.update({k: list(v) for k, v in answer.items()})
        if detail:
            out["detail"] = {k: {**v, "workers": {str(w): d for w, d in v["workers"].items()}}
                             for k, v in self.lookup_detailed(tokens).items()}
        return json.dumps(out).encode()

    def holder_counts(self):
        counts = {}
        for held in self.ref.holdings.values():
            for h in held:
                counts[h] = counts.get(h, 0) + 1
        return [(i, w, loc, n) for (i, w, loc), n in counts.items()]

    def stats(self):
        holders = {h for held in self.ref.holdings.values() for h in held}
        return {
            "chunks": len(self.ref.holdings),
            "holdings": sum(len(v) for v in self.ref.holdings.values()),
            "holders": len(holders),
            "instances": len(self.ref.workers),
            "workers": sum(len(w) for w in self.ref.workers.values()),
        }

    def __len__(self):
        return len(self.ref.holdings)
