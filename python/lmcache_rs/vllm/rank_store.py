"""One vLLM rank's side of the connector, free of vLLM: a KVWorker over the rank's paged KV
cache, what the scheduler asks it over the rank channel, and each step's loads and saves.

The connector (connector.py) hands it what vLLM hands the connector; this module never
imports vLLM, so it runs and is tested on plain torch tensors laid out as vLLM lays them out.
Threads: the rank channel's thread calls ``answer``; vLLM's forward thread calls the step
methods; P2P fetches run on threads of their own; one saver thread stores what the steps
copied out, off the forward's path (a lookup waits for the saves before it, so a prompt saved
in one step is found by the next request). They share holds, failed loads and the stats,
each under a lock.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Mapping, Optional

import torch

from lmcache_rs.config import LMCacheConfig
from lmcache_rs.log_limit import RateLimitedLog
from lmcache_rs.worker import KVWorker
from lmcache_rs.worker.store import dtype_name

from . import layout, timing
from .plan import LoadSpec, SaveSpec, StepPlan
from .presence import PresenceTable, first_key
from .rank_channel import RankClient

log = logging.getLogger("lmcache_rs.vllm")

# A hold whose load never came (request aborted between steps) ends after this many seconds.
HOLD_SECONDS = 120.0
# Outcomes of P2P fetches kept for the scheduler to read; past this, unread ended ones are dropped.
MAX_FETCH_STATES = 4096
# CPU staging buffers kept for reuse once their save is stored: a fresh one costs a page fault
# per page on its first copy, during the forward (CUDA's caching allocator reuses memory itself).
SPARE_BUFFERS = 2
SPARE_MAX_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass
class Staged:
    """One request's part of a step's saves: its blocks copied out whole, per layer."""

    spec: SaveSpec
    first_block: int  # index in spec.block_ids of the first staged block
    block_ids: torch.Tensor  # the staged blocks' ids, on the cache's device
    blocks: torch.Tensor  # [num_layers, *layer tensor with len(block_ids) blocks], a view of buffer
    buffer: torch.Tensor  # flat, reused for later steps once stored
    marked: Optional[int] = None  # the first chunk's key, marked in the presence table until stored


class RankStore:
    """The store of TP rank ``rank`` on its layers ``kv_caches`` (layer name -> vLLM's tensor).
    ``cpu_isa``: vLLM's CPU attention kernel, for the ``cpu`` layout. ``peers``: the other TP
    ranks' channels, told of a failed load before this rank's forward (their tokens of this
    step depend on it through the all-reduce, so none of them may save the request).
    ``presence_path``: where to publish the store's presence table (presence.py). Raises
    layout.UnsupportedLayout for caches it cannot read, OSError/ValueError when the worker
    cannot start (a port taken, a bad config)."""

    def __init__(self, config: LMCacheConfig, rank: int, block_size: int, kv_caches: Mapping[str, torch.Tensor],
                 num_kv_heads: int, head_dim: int, cpu_isa: Optional[str] = None,
                 peers: Optional[RankClient] = None, presence_path: Optional[str] = None):
        kind, names, views = layout.describe(kv_caches, block_size, num_kv_heads, head_dim)
        if kind == "cpu" and cpu_isa not in layout.CPU_ISAS:
            raise layout.UnsupportedLayout(
                f"vLLM's CPU attention kernel here is {cpu_isa!r}, which packs blocks in a layout this connector "
                f"does not read (it reads {', '.join(layout.CPU_ISAS)}; float32 KV uses 'vec')")
        first = views[0].key
        config = dataclasses.replace(config, num_layers=len(names), num_kv_heads=num_kv_heads, head_dim=head_dim,
                                     kv_dtype=dtype_name(first.dtype))
        self._side_stream = torch.cuda.Stream(device=first.device) if first.device.type == "cuda" else None
        self.worker = KVWorker(config, worker_id=rank)  # last: nothing after it can fail
        self.presence = self._publish_presence(presence_path) if presence_path else None
        self.peers = peers
        self.rank = rank
        self.block_size = block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.layer_index = {name: i for i, name in enumerate(names)}
        self.kind = kind
        self.layers = [kv_caches[name] for name in names]
        self.views = views
        self.stats = {"loaded_tokens": 0, "saved_tokens": 0, "load_failures": 0, "save_failures": 0}
        self._warn = RateLimitedLog(log, burst=5, period=30.0)
        self._holds: dict[str, tuple[list[int], float]] = {}  # request -> (held keys, deadline)
        self._holds_lock = threading.Lock()
        self._fetch_states: dict[str, str] = {}
        self._load_errors: set[int] = set()
        self._stats_lock = threading.Lock()
        self._staging: list[Staged] = []
        self._layers_copied: set[int] = set()  # this step's layers copied out for saving
        self._copy_failed = False
        self._copy_ns = 0  # this step's time in copy_layer, for timing
        # requests whose load failed here or on a peer rank: never saved again (their later
        # tokens were computed on top of the missing KV); forgotten when the request is released
        self._failed_loads: set[str] = set()
        self._failed_lock = threading.Lock()
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="lmcache-save")
        self._last_save: Optional[Future] = None  # one thread: when it is done, all saves are
        self._spare: list[torch.Tensor] = []  # staging buffers free for reuse (the saver returns them)
        log.info("lmcache_rs connector on rank %d: %d layers, layout %s, %s %s, chunk_size %d, instance %s",
                 rank, len(names), kind, dtype_name(first.dtype), first.device, config.chunk_size,
                 config.lmcache_instance_id)

    def _publish_presence(self, path: str) -> Optional[PresenceTable]:
        try:
            table = PresenceTable(path)
        except OSError as exc:  # the scheduler then asks about every request
            log.warning("lmcache_rs connector on rank %d: no presence table at %s (%s)", self.rank, path, exc)
            return None
        self.worker.kvstore.watch(table.change)
        table.publish()
        return table

    def close(self) -> None:
        self.flush_saves()
        self._saver.shutdown(wait=True)
        if self.presence is not None:
            self.presence.close()
        log.info("lmcache_rs connector (rank %d): %s", self.rank, self.stats)
        if self.peers is not None:
            self.peers.close()
        self.worker.close()

    # -- the rank channel (its own thread) ---------------------------------------------------
    def answer(self, request: dict) -> dict:
        """A request from the scheduler (hold, fetch, fetch_state) or a peer rank (load_failed)."""
        op = request.get("op")
        if op == "hold":
            self.flush_saves()  # the prompts of earlier steps are in the store before it is asked
            started = timing.now()
            matched = self._hold(str(request["req"]), list(request["tokens"]))
            timing.add("hold", timing.now() - started)
            return {"tokens": matched}
        if op == "fetch":
            self._fetch(str(request["req"]), list(request["tokens"]), request["sources"])
            return {}
        if op == "load_failed":  # a peer rank's load of this request failed
            with self._failed_lock:
                self._failed_loads.add(str(request["req"]))
            return {}
        if op == "fetch_state":
            request_id = str(request["req"])
            state = self._fetch_states.get(request_id, "failed")
            if state != "pending":
                self._fetch_states.pop(request_id, None)
            return {"state": state}
        raise ValueError(f"unknown op {op!r}")

    def _hold(self, request_id: str, tokens: list[int]) -> int:
        store = self.worker.kvstore
        matched, keys = store.hold(tokens)
        now = time.monotonic()
        with self._holds_lock:
            expired = [r for r, (_k, deadline) in self._holds.items() if deadline < now]
            old = self._holds.pop(request_id, None)
            self._holds[request_id] = (keys, now + HOLD_SECONDS)
            for r in expired:
                if r != request_id:
                    store.release(self._holds.pop(r)[0])
        if old is not None:
            store.release(old[0])
        return matched

    def _release_expired(self) -> None:
        """End holds older than HOLD_SECONDS: their request left without a release."""
        now = time.monotonic()
        with self._holds_lock:
            expired = [r for r, (_k, deadline) in self._holds.items() if deadline < now]
            keys = [self._holds.pop(r)[0] for r in expired]
        for held in keys:
            self.worker.kvstore.release(held)

    def _release(self, request_id: str) -> None:
        with self._holds_lock:
            held = self._holds.pop(request_id, None)
        if held is not None:
            self.worker.kvstore.release(held[0])

    def _fetch(self, request_id: str, tokens: list[int], sources: dict) -> None:
        if len(self._fetch_states) > MAX_FETCH_STATES:  # ended fetches nobody asked about (timed out, aborted)
            for ended in [r for r, state in list(self._fetch_states.items()) if state != "pending"]:
                self._fetch_states.pop(ended, None)
        source = sources.get(self.rank, sources.get(str(self.rank)))
        if source is None:
            self._fetch_states[request_id] = "failed"
            return
        self._fetch_states[request_id] = "pending"

        def run() -> None:
            try:
                self.worker.fetch(tokens, (str(source[0]), int(source[1])))
                self._fetch_states[request_id] = "done"
            except Exception as exc:
                self._warn("P2P fetch of %d tokens from %s:%s failed: %s", len(tokens), source[0], source[1], exc)
                self._fetch_states[request_id] = "failed"

        threading.Thread(target=run, name="lmcache-p2p-fetch", daemon=True).start()

    # -- per step (vLLM's forward thread) ---------------------------------------------------
    def start_step(self, plan: StepPlan) -> None:
        """Before the forward: end the holds the plan releases, run its loads."""
        for request_id in plan.releases:
            self._release(request_id)
            with self._failed_lock:
                self._failed_loads.discard(request_id)
        self._release_expired()
        for spec in plan.loads:
            try:
                ok = self._load(spec)
            except Exception:
                ok = False
                self._count("load_failures")
                log.exception("loading %d tokens of request %s failed; its blocks are reported to vLLM",
                              spec.end - spec.start, spec.request_id)
                self._load_errors.update(self._blocks_of(spec.block_ids, spec.start, spec.end))
            finally:
                self._release(spec.request_id)
            if not ok:
                with self._failed_lock:
                    self._failed_loads.add(spec.request_id)
                if self.peers is not None and self.peers.ask({"op": "load_failed", "req": spec.request_id}) is None:
                    log.error("could not tell every peer rank that request %s's load failed", spec.request_id)

    def _load(self, spec: LoadSpec) -> bool:
        """Write the planned tokens into the request's blocks; False (and the blocks not
        written reported to vLLM) when the store had less than promised."""
        matched, kv = self.worker.retrieve(spec.tokens)
        end = min(matched, spec.end)
        if end > spec.start:
            device = self.views[0].key.device
            blocks, offsets = layout.slot_indices(spec.block_ids, self.block_size, spec.start, end, device)
            layout.scatter(self.views, blocks, offsets, kv[:, :, spec.start:end])
            self._count("loaded_tokens", end - spec.start)
        if end < spec.end:
            self._count("load_failures")
            self._warn("request %s: the store held %d of %d promised tokens; the rest is reported to vLLM",
                       spec.request_id, end, spec.end)
            self._load_errors.update(self._blocks_of(spec.block_ids, max(end, spec.start), spec.end))
            return False
        return True

    def _blocks_of(self, block_ids: list[int], start: int, end: int) -> set[int]:
        if end <= start:
            return set()
        return set(block_ids[start // self.block_size: (end - 1) // self.block_size + 1])

    def copy_layer(self, layer_name: str, plan: StepPlan) -> None:
        """After ``layer_name``'s attention ran: copy out its part of the plan's saves (on a
        side stream on GPU). A request whose load failed this step is not saved."""
        index = self.layer_index.get(layer_name)
        if index is None or not plan.saves:
            return
        if self._copy_failed:
            return
        started = timing.now()
        try:
            if not self._layers_copied and not self._staging:
                with self._failed_lock:
                    saves = [spec for spec in plan.saves if spec.request_id not in self._failed_loads]
                self._stage(saves)
            stream = self._side_stream
            if stream is not None:  # wait for the layer's kernels, copy without holding up the next
                stream.wait_stream(torch.cuda.current_stream(stream.device))
                with torch.cuda.stream(stream):
                    self._copy_layer(index)
            else:
                self._copy_layer(index)
            self._layers_copied.add(index)
            self._copy_ns += timing.now() - started
        except Exception:
            self._count("save_failures")
            log.exception("copying layer %s out for saving failed; this step saves nothing", layer_name)
            self._staging = []
            self._copy_failed = True

    def _stage(self, saves: list[SaveSpec]) -> None:
        first = self.layers[0]
        dim = layout.block_dim(self.kind)
        for spec in saves:
            begin, end = spec.start // self.block_size, -(-len(spec.tokens) // self.block_size)
            block_ids = torch.as_tensor(spec.block_ids[begin:end], dtype=torch.long).to(first.device)
            shape = [len(self.layers), *first.shape]
            shape[1 + dim] = end - begin
            buffer = self._buffer(math.prod(shape))
            self._staging.append(Staged(spec, begin, block_ids, buffer[: math.prod(shape)].view(shape), buffer))

    def _buffer(self, numel: int) -> torch.Tensor:
        """A flat staging buffer of at least ``numel`` elements: a spare one when it fits."""
        for i, buffer in enumerate(self._spare):
            if buffer.numel() >= numel:
                return self._spare.pop(i)
        first = self.layers[0]
        return torch.empty(numel, dtype=first.dtype, device=first.device)

    def _copy_layer(self, index: int) -> None:
        # whole blocks as vLLM lays them out: reordering them into tokens waits for the saver
        for staged in self._staging:
            layout.copy_blocks(self.layers[index], self.kind, staged.block_ids, staged.blocks[index])

    def finish_step(self) -> None:
        """After the forward: hand what every layer copied out to the saver thread."""
        staged, self._staging = self._staging, []
        copied, self._layers_copied = len(self._layers_copied), set()
        self._copy_failed = False
        copy_ns, self._copy_ns = self._copy_ns, 0
        if not staged:
            return
        timing.add("copy_out", copy_ns)
        started = timing.now()
        if copied != len(self.views):  # a layer never came by: the staged KV is incomplete
            self._count("save_failures")
            self._warn("only %d of %d layers were copied out this step; nothing is saved", copied, len(self.views))
            return
        with self._failed_lock:  # a peer's load may have failed after staging
            staged = [s for s in staged if s.spec.request_id not in self._failed_loads]
        if not staged:
            return
        copied_out = None
        if self._side_stream is not None:  # the saver waits for the copies, not the forward
            copied_out = torch.cuda.Event()
            copied_out.record(self._side_stream)
        if self.presence is not None:  # until stored, the scheduler must ask rather than call it a miss
            store = self.worker.kvstore
            for item in staged:
                if item.spec.start == 0:
                    item.marked = first_key(item.spec.tokens, store.chunk_size, store.seed)
                    self.presence.mark(item.marked, 1)
        self._last_save = self._saver.submit(self._save, staged, copied_out)
        timing.add("store", timing.now() - started)

    def _save(self, staged: list[Staged], copied_out: Optional[torch.cuda.Event]) -> None:
        """The saver thread: reorder the staged blocks into the store's layout and store them."""
        started = timing.now()
        try:
            if copied_out is not None:
                copied_out.synchronize()
            ready = True
        except Exception:
            self._count("save_failures")
            log.exception("waiting for a step's copies out failed; its saves are dropped")
            ready = False
        for item in staged:
            spec = item.spec
            try:
                if ready:
                    self.worker.store(spec.tokens, self._unstage(item), start=spec.start)
                    self._count("saved_tokens", len(spec.tokens) - spec.start)
            except Exception:
                self._count("save_failures")
                log.exception("saving %d tokens of request %s failed", len(spec.tokens) - spec.start,
                              spec.request_id)
            finally:
                if item.marked is not None and self.presence is not None:
                    self.presence.mark(item.marked, -1)
                buffer = item.buffer
                if buffer.device.type == "cpu" and buffer.numel() * buffer.element_size() <= SPARE_MAX_BYTES \
                        and len(self._spare) < SPARE_BUFFERS:
                    self._spare.append(buffer)  # the forward thread only pops: no lock needed
        timing.add("store_side", timing.now() - started)

    def _unstage(self, item: Staged) -> torch.Tensor:
        """The staged tokens ``spec.start..`` as ``[num_layers, 2, T, H, D]``."""
        spec = item.spec
        offset = item.first_block * self.block_size  # the staged blocks' first token
        blocks, offsets = layout.slot_indices(range(item.block_ids.numel()), self.block_size, spec.start - offset,
                                              len(spec.tokens) - offset, item.blocks.device)
        return layout.gather([layout.layer_views(layer, self.kind) for layer in item.blocks], blocks, offsets)

    def flush_saves(self) -> None:
        """Wait until the saves of every finished step are in the store."""
        last = self._last_save
        if last is not None:
            last.result()

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:  # the saver thread counts too
            self.stats[name] += n

    def take_load_errors(self) -> set[int]:
        """Blocks whose load failed since the last call (vLLM recomputes or fails them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors
