"""One vLLM rank's side of the connector, free of vLLM: a KVWorker over the rank's paged KV
cache, what the scheduler asks it over the rank channel, and each step's loads and saves.

The connector (connector.py) hands it what vLLM hands the connector; this module never
imports vLLM, so it runs and is tested on plain torch tensors laid out as vLLM lays them out.
Threads: the rank channel's thread calls ``answer``; vLLM's forward thread calls the step
methods; P2P fetches run on threads of their own. Holds are the only state they share (a lock).
The store's admits and evictions also update the rank's presence table (presence.py), which
the scheduler reads to know a miss without asking.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Mapping, Optional

import torch

from lmcache_rs.config import LMCacheConfig
from lmcache_rs.log_limit import RateLimitedLog
from lmcache_rs.worker import KVWorker
from lmcache_rs.worker.store import PendingStore, dtype_name

from . import layout, timing
from .plan import LoadSpec, SaveSpec, StepPlan
from .presence import PresenceTable
from .rank_channel import RankClient

log = logging.getLogger("lmcache_rs.vllm")

# A hold whose load never came (request aborted between steps) ends after this many seconds.
HOLD_SECONDS = 120.0
# Outcomes of P2P fetches kept for the scheduler to read; past this, unread ended ones are dropped.
MAX_FETCH_STATES = 4096


@dataclasses.dataclass
class Staged:
    """One request's part of a step's saves: runs of tokens, each copied layer by layer into
    its ``[num_layers, 2, T, H, D]`` out. On CPU the outs are the store's own reserved slots,
    one run per chunk (one copy in all); on GPU one run into a device tensor, stored after."""

    spec: SaveSpec
    runs: list[layout.TokenRun]
    outs: list[torch.Tensor]
    pending: Optional[PendingStore] = None  # CPU: the reserved slots, committed at the step's end
    outs_bytes: Optional[list] = None  # CPU, packed layers: each out as layout.bytes_view makes it


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
        # saves write straight into the pool during vLLM's step: fault its pages in now, not then
        if not self.worker.kvstore.cpu.populate():
            log.info("lmcache_rs connector on rank %d: the CPU pool's pages fault in as it fills", rank)
        self.peers = peers
        self.rank = rank
        self.block_size = block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.layer_index = {name: i for i, name in enumerate(names)}
        self.views = views
        self.stats = {"loaded_tokens": 0, "saved_tokens": 0, "load_failures": 0, "save_failures": 0}
        self._warn = RateLimitedLog(log, burst=5, period=30.0)
        self._holds: dict[str, tuple[list[int], float]] = {}  # request -> (held keys, deadline)
        self._holds_lock = threading.Lock()
        self._fetch_states: dict[str, str] = {}
        self._load_errors: set[int] = set()
        self._staging: list[Staged] = []
        self._layers_copied: set[int] = set()  # this step's layers copied out for saving
        self._copy_failed = False
        # requests whose load failed here or on a peer rank: never saved again (their later
        # tokens were computed on top of the missing KV); forgotten when the request is released
        self._failed_loads: set[str] = set()
        self._failed_lock = threading.Lock()
        self._copy_ns = 0  # this step's time in copy_layer, for timing
        self.presence = self._publish_presence(presence_path) if presence_path else None
        log.info("lmcache_rs connector on rank %d: %d layers, layout %s, %s %s, chunk_size %d, instance %s",
                 rank, len(names), kind, dtype_name(first.dtype), first.device, config.chunk_size,
                 config.lmcache_instance_id)

    def _publish_presence(self, path: str) -> Optional[PresenceTable]:
        table = None
        try:
            table = PresenceTable(path)
            self.worker.kvstore.watch(table.change)
            table.publish()
        except OSError as exc:  # the scheduler then asks about every request
            log.warning("lmcache_rs connector on rank %d: no presence table at %s (%s)", self.rank, path, exc)
            if table is not None:
                table.close()
            return None
        return table

    def close(self) -> None:
        log.info("lmcache_rs connector (rank %d): %s", self.rank, self.stats)
        if self.presence is not None:
            self.presence.close()
        if self.peers is not None:
            self.peers.close()
        self.worker.close()

    # -- the rank channel (its own thread) ---------------------------------------------------
    def answer(self, request: dict) -> dict:
        """A request from the scheduler (hold, fetch, fetch_state) or a peer rank (load_failed)."""
        op = request.get("op")
        if op == "hold":
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
                self.stats["load_failures"] += 1
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
            copied = False
            if self.views[0].packed is not None and spec.start % self.block_size == 0:
                copy_started = timing.now()
                run = layout.token_run(spec.block_ids, self.block_size, spec.start, end, device)
                copied = layout.copy_run_in(self.views, run, kv, spec.start)
                timing.add("load_copy", timing.now() - copy_started)
            if not copied:
                blocks, offsets = layout.slot_indices(spec.block_ids, self.block_size, spec.start, end, device)
                layout.scatter(self.views, blocks, offsets, kv[:, :, spec.start:end])
            self.stats["loaded_tokens"] += end - spec.start
        if end < spec.end:
            self.stats["load_failures"] += 1
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
                timing.add("stage", timing.now() - started)
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
            self.stats["save_failures"] += 1
            log.exception("copying layer %s out for saving failed; this step saves nothing", layer_name)
            self._drop_staging()
            self._copy_failed = True

    def _stage(self, saves: list[SaveSpec]) -> None:
        device = self.views[0].key.device
        for spec in saves:
            if device.type == "cpu":  # straight into the store's slots: no second copy
                pending = self.worker.kvstore.reserve(spec.tokens, spec.start)
                runs = [layout.token_run(spec.block_ids, self.block_size, begin, end, device)
                        for begin, end, _view in pending.writes]
                outs = [view for _b, _e, view in pending.writes]
                outs_bytes = [layout.bytes_view(out) for out in outs] if self.views[0].packed is not None else None
                self._staging.append(Staged(spec, runs, outs, pending, outs_bytes))
            else:
                end = len(spec.tokens)
                kv = torch.empty((len(self.views), 2, end - spec.start, self.num_kv_heads, self.head_dim),
                                 dtype=self.views[0].key.dtype, device=device)
                self._staging.append(Staged(spec, [layout.token_run(spec.block_ids, self.block_size, spec.start,
                                                                    end, device)], [kv]))

    def _copy_layer(self, index: int) -> None:
        views = self.views[index]
        for staged in self._staging:
            outs_bytes = staged.outs_bytes or [None] * len(staged.outs)
            for run, out, out_bytes in zip(staged.runs, staged.outs, outs_bytes):
                layout.copy_run(views, run, out[index], None if out_bytes is None else out_bytes[index])

    def _drop_staging(self) -> None:
        for staged in self._staging:
            if staged.pending is not None:
                self.worker.kvstore.cancel(staged.pending)
        self._staging = []

    def finish_step(self) -> None:
        """After the forward: store what every layer copied out."""
        copied, self._layers_copied = len(self._layers_copied), set()
        self._copy_failed = False
        copy_ns, self._copy_ns = self._copy_ns, 0
        if not self._staging:
            return
        timing.add("copy_out", copy_ns)
        started = timing.now()
        if copied != len(self.views):  # a layer never came by: the staged KV is incomplete
            self._drop_staging()
            self.stats["save_failures"] += 1
            self._warn("only %d of %d layers were copied out this step; nothing is saved", copied, len(self.views))
            return
        if self._side_stream is not None:
            self._side_stream.synchronize()
        staged, self._staging = self._staging, []
        for item in staged:
            spec = item.spec
            with self._failed_lock:
                failed = spec.request_id in self._failed_loads  # a peer's load failed after staging
            try:
                if failed:
                    if item.pending is not None:
                        self.worker.kvstore.cancel(item.pending)
                    continue
                if item.pending is not None:
                    self.worker.kvstore.commit(item.pending)
                else:
                    self.worker.store(spec.tokens, item.outs[0], start=spec.start)
                self.stats["saved_tokens"] += len(spec.tokens) - spec.start
            except Exception:
                self.stats["save_failures"] += 1
                log.exception("saving %d tokens of request %s failed", len(spec.tokens) - spec.start,
                              spec.request_id)
        timing.add("store", timing.now() - started)

    def take_load_errors(self) -> set[int]:
        """Blocks whose load failed since the last call (vLLM recomputes or fails them)."""
        errors, self._load_errors = self._load_errors, set()
        return errors
