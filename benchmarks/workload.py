"""Seeded, reproducible workloads shared by every benchmark process.

The same seed gives the same tokens in every process and in every virtualenv: tokens come
from ``random.Random(seed).randbytes`` (a stable stream of the standard library), reduced
modulo a Llama-3-sized vocabulary with numpy (exact integer arithmetic). Nothing here
depends on the project or on an anchor, so the project venv and the benchmark venv both
import it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

VOCAB = 128_000
LOCATION = "LocalCPUBackend"


def random_tokens(rng: random.Random, n: int) -> np.ndarray:
    """n token ids in [0, VOCAB) as a uint32 array, drawn from ``rng``."""
    raw = np.frombuffer(rng.randbytes(4 * n), dtype="<u4")
    return (raw % VOCAB).astype(np.uint32)


def instance_name(i: int) -> str:
    return f"inst{i}"


# --------------------------------------------------------------------------------------
# HTTP workload: ~4k-token prompts held by several instances, half the queries hit.
# --------------------------------------------------------------------------------------


@dataclass
class HttpWorkload:
    chunk_size: int
    prompt_tokens: int
    # stored[i] is an array (prompts, prompt_tokens) of the prompts instance i holds.
    stored: list[np.ndarray]
    # Each query: tokens (uint32 array) and the expected answer {instance: matched tokens}.
    queries: list[tuple[np.ndarray, dict[str, int]]] = field(default_factory=list)

    @property
    def instances(self) -> list[str]:
        return [instance_name(i) for i in range(len(self.stored))]

    @property
    def stored_chunks(self) -> int:
        per_prompt = -(-self.prompt_tokens // self.chunk_size)
        return sum(a.shape[0] for a in self.stored) * per_prompt


def http_workload(
    seed: int = 1,
    instances: int = 4,
    prompts_per_instance: int = 512,
    prompt_tokens: int = 4096,
    chunk_size: int = 256,
    queries: int = 256,
) -> HttpWorkload:
    """Every stored prompt is held by exactly one instance (so that LMCache, which reports
    only the first holder of a chunk, and an exact index give the same answer). Even
    queries hit: the first k chunks (1..all) of a stored prompt followed by fresh tokens up
    to ``prompt_tokens``; odd queries are fresh tokens and miss everywhere."""
    rng = random.Random(seed)
    stored = [
        random_tokens(rng, prompts_per_instance * prompt_tokens).reshape(
            prompts_per_instance, prompt_tokens
        )
        for _ in range(instances)
    ]
    wl = HttpWorkload(chunk_size=chunk_size, prompt_tokens=prompt_tokens, stored=stored)
    full_chunks = prompt_tokens // chunk_size
    pick = random.Random(seed + 1)
    for q in range(queries):
        if q % 2 == 0:
            i = pick.randrange(instances)
            p = pick.randrange(prompts_per_instance)
            k = pick.randint(1, full_chunks)
            head = stored[i][p, : k * chunk_size]
            tail = random_tokens(rng, prompt_tokens - k * chunk_size)
            toks = np.concatenate([head, tail]).astype(np.uint32)
            wl.queries.append((toks, {instance_name(i): k * chunk_size}))
        else:
            wl.queries.append((random_tokens(rng, prompt_tokens), {}))
    return wl


# --------------------------------------------------------------------------------------
# Index workload: about a million (holder, chunk) pairs, plus real prompts to look up.
# --------------------------------------------------------------------------------------


@dataclass
class IndexWorkload:
    chunk_size: int
    instances: int
    seq_chunks: int
    # Real prompts, looked up from tokens: (prompts, seq_chunks * chunk_size) uint32.
    prompts: np.ndarray
    prompt_groups: list[int]  # group whose shared prefix prompt p starts with
    prompt_prefix_chunks: int
    prompt_holders: list[list[int]]  # instances holding all of prompt p's chunks
    # Filler sequences as random chunk keys (uint64 < 2^63), (sequences, seq_chunks), with
    # per-block local keys for trees that want them; sequences of a group share a prefix.
    filler_keys: np.ndarray
    filler_local: np.ndarray
    filler_groups: list[int]
    filler_prefix_chunks: int
    filler_holders: list[list[int]]
    miss_queries: np.ndarray  # (n, 16 * chunk_size) fresh tokens: a miss everywhere

    def holdings(self) -> int:
        """Distinct (instance, chunk) pairs the whole workload admits."""
        total = 0
        for i in range(self.instances):
            pg = {self.prompt_groups[p] for p, h in enumerate(self.prompt_holders) if i in h}
            pn = sum(1 for h in self.prompt_holders if i in h)
            fg = {self.filler_groups[s] for s, h in enumerate(self.filler_holders) if i in h}
            fn = sum(1 for h in self.filler_holders if i in h)
            total += len(pg) * self.prompt_prefix_chunks
            total += pn * (self.seq_chunks - self.prompt_prefix_chunks)
            total += len(fg) * self.filler_prefix_chunks
            total += fn * (self.seq_chunks - self.filler_prefix_chunks)
        return total

    def chunks(self) -> int:
        """Distinct chunks (tree nodes) the whole workload admits."""
        return (
            len(set(self.prompt_groups)) * self.prompt_prefix_chunks
            + len(self.prompt_holders) * (self.seq_chunks - self.prompt_prefix_chunks)
            + len(set(self.filler_groups)) * self.filler_prefix_chunks
            + len(self.filler_holders) * (self.seq_chunks - self.filler_prefix_chunks)
        )


def random_keys(rng: random.Random, shape: tuple[int, ...]) -> np.ndarray:
    """Random nonzero 63-bit keys (some trees take signed 64-bit ids)."""
    n = int(np.prod(shape)) if shape else 1
    raw = np.frombuffer(rng.randbytes(8 * n), dtype="<u8") >> np.uint64(1)
    return (raw | np.uint64(1)).reshape(shape)


def index_workload(
    seed: int = 7,
    holdings: int = 1_000_000,
    instances: int = 4,
    seq_chunks: int = 64,
    chunk_size: int = 256,
    prompts: int = 256,
    prompt_groups: int = 32,
    prompt_prefix_chunks: int = 4,
    filler_groups: int = 64,
    filler_prefix_chunks: int = 8,
    miss_queries: int = 256,
) -> IndexWorkload:
    """Sequences of ``seq_chunks`` chunks, each held by one or two instances; sequences of
    a group share a prefix (a system prompt). ``prompts`` of them are real token prompts
    (looked up from tokens); the rest, up to about ``holdings`` (holder, chunk) pairs, are
    filler given directly as random chunk keys."""
    rng = random.Random(seed)
    pick = random.Random(seed + 1)
    seq_tokens = seq_chunks * chunk_size
    pre_tokens = prompt_prefix_chunks * chunk_size
    group_prefix = random_tokens(rng, prompt_groups * pre_tokens).reshape(prompt_groups, pre_tokens)
    body = random_tokens(rng, prompts * (seq_tokens - pre_tokens)).reshape(prompts, seq_tokens - pre_tokens)
    groups = [pick.randrange(prompt_groups) for _ in range(prompts)]
    toks = np.ascontiguousarray(np.concatenate([group_prefix[groups], body], axis=1), dtype=np.uint32)

    def holders_of() -> list[int]:
        first = pick.randrange(instances)
        if instances > 1 and pick.random() < 0.5:
            return [first, (first + 1 + pick.randrange(instances - 1)) % instances]
        return [first]

    prompt_holders = [holders_of() for _ in range(prompts)]
    avg_holders = 1.5 if instances > 1 else 1.0
    # group prefixes are shared, so a sequence adds about avg_holders * its unique chunks
    uniq = seq_chunks - filler_prefix_chunks
    prompt_share = prompts * (seq_chunks - prompt_prefix_chunks)
    n_filler = max(1, round((holdings / avg_holders - prompt_share) / uniq))
    group_keys = random_keys(rng, (filler_groups, filler_prefix_chunks))
    group_local = random_keys(rng, (filler_groups, filler_prefix_chunks))
    fgroups = [pick.randrange(filler_groups) for _ in range(n_filler)]
    keys = np.concatenate([group_keys[fgroups], random_keys(rng, (n_filler, uniq))], axis=1)
    local = np.concatenate([group_local[fgroups], random_keys(rng, (n_filler, uniq))], axis=1)
    filler_holders = [holders_of() for _ in range(n_filler)]
    misses = random_tokens(rng, miss_queries * 16 * chunk_size).reshape(miss_queries, 16 * chunk_size)
    return IndexWorkload(
        chunk_size=chunk_size,
        instances=instances,
        seq_chunks=seq_chunks,
        prompts=toks,
        prompt_groups=groups,
        prompt_prefix_chunks=prompt_prefix_chunks,
        prompt_holders=prompt_holders,
        filler_keys=np.ascontiguousarray(keys, dtype=np.uint64),
        filler_local=np.ascontiguousarray(local, dtype=np.uint64),
        filler_groups=fgroups,
        filler_prefix_chunks=filler_prefix_chunks,
        filler_holders=filler_holders,
        miss_queries=np.ascontiguousarray(misses, dtype=np.uint32),
    )
