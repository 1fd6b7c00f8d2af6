"""LMCacheRsConnector: lmcache_rs's store inside vLLM, as a v1 KV connector.

::

    LMCACHE_CONFIG_FILE=example.yaml python -m vllm.entrypoints.openai.api_server --model M \\
        --kv-transfer-config '{"kv_connector": "LMCacheRsConnector",
                               "kv_connector_module_path": "lmcache_rs.vllm", "kv_role": "kv_both"}'

Each worker process (one tensor-parallel rank) runs a ``KVWorker`` on its rank's KV: the CPU
pool (and disk tier), reporting to the controller, the command port and the P2P port, as the
standalone ``lmcache_worker`` does, configured by the same YAML. The model's shape (layers, KV
heads, head size, dtype) and ``world_size`` come from vLLM.

Scheduler side (EngineCore process): for each new request it asks the ranks over the rank
channel how much of the prompt they hold (rank_channel.py), which also holds those chunks
until they are loaded; when the local store has less than another instance per the
controller's ``/lookup`` (``controller_lookup_url``), it has the ranks fetch that prefix from
the other instance's P2P ports first (the request waits a step or more meanwhile, then loads
locally). Worker side: loads planned tokens into vLLM's blocks before the forward, copies
newly computed prompt tokens out per layer during it and stores them in ``wait_for_save``.

Nothing here raises into vLLM: a failed lookup, fetch or save is logged and counted, and
planned no load means vLLM computes. Requests with a LoRA adapter, a cache salt,
multimodal inputs or prompt embeddings are neither loaded nor saved (the store's keys are
token ids alone).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache_rs.config import LMCacheConfig, load_config
from lmcache_rs.log_limit import RateLimitedLog

from . import layout
from .controller_client import ControllerClient
from .plan import LoadSpec, Planner, SaveSpec, StepPlan
from .rank_channel import RankClient, RankServer, channel_path

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("lmcache_rs.vllm")

# A hold whose load never came (request aborted between steps) ends after this many seconds.
HOLD_SECONDS = 120.0
# How long a request waits for a P2P fetch before it is computed instead.
FETCH_SECONDS = 30.0
# Outcomes of P2P fetches kept for the scheduler to read; past this, unread ended ones are dropped.
MAX_FETCH_STATES = 4096
# After a rank did not answer a lookup, new requests are computed without asking for this long.
RANK_BACKOFF_SECONDS = 5.0
# vLLM CPU attention kernels whose block layout layout.py's "cpu" kind describes (checked
# against vLLM's own cache writer); "amx" and "neon" pack blocks otherwise.
CPU_ISAS = ("vec", "vec16")


@dataclasses.dataclass
class ConnectorPlan(KVConnectorMetadata):
    """One step's plan (plan.StepPlan), as vLLM's connector metadata."""

    step: StepPlan = dataclasses.field(default_factory=StepPlan)


def connector_config(vllm_config: "VllmConfig") -> LMCacheConfig:
    """The LMCache config: the file named by ``kv_connector_extra_config["config_file"]``,
    else $LMCACHE_CONFIG_FILE, then the LMCACHE_* variables; world_size comes from vLLM."""
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    path = extra.get("config_file")
    config = load_config(str(path)) if path else load_config()
    config.world_size = vllm_config.parallel_config.tensor_parallel_size
    return config.validate()


def _engine_id(vllm_config: "VllmConfig") -> tuple[str, int]:
    return str(vllm_config.instance_id or os.getpid()), int(vllm_config.parallel_config.data_parallel_rank or 0)


def _skips(request: Any) -> Optional[str]:
    """Why a request must not share the store, or None."""
    if getattr(request, "lora_request", None) is not None:
        return "LoRA adapter"
    if getattr(request, "cache_salt", None):
        return "cache salt"
    if getattr(request, "mm_features", None):
        return "multimodal input"
    if getattr(request, "prompt_embeds", None) is not None:
        return "prompt embeddings"
    if not request.prompt_token_ids:
        return "no prompt token ids"
    return None


class LMCacheRsConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config = connector_config(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        # pipeline stages and data-parallel engines would share the ranks' ports (base + TP
        # rank) and instance id: not supported, the connector stays off
        parallel = vllm_config.parallel_config
        self.unsupported_parallelism = parallel.pipeline_parallel_size > 1 or parallel.data_parallel_size > 1
        self.stats: dict[str, int] = {
            "lookups": 0, "hit_tokens": 0, "loaded_tokens": 0, "saved_tokens": 0, "load_failures": 0,
            "save_failures": 0, "lookup_failures": 0, "fetches": 0, "fetch_failures": 0, "skipped": 0,
        }
        self._warn = RateLimitedLog(log, burst=5, period=30.0)
        engine, dp_rank = _engine_id(vllm_config)
        world = self.config.world_size
        self._endpoints = [channel_path(engine, dp_rank, rank) for rank in range(world)]
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker(vllm_config)

    # ================================ scheduler side ========================================
    def _init_scheduler(self) -> None:
        if self.config.chunk_size % self.block_size and self.config.chunk_size > self.block_size:
            log.info("chunk_size %d is not a multiple of vLLM's block_size %d: loads still cover whole "
                     "tokens, chunks span block boundaries", self.config.chunk_size, self.block_size)
        if getattr(self._kv_transfer_config, "kv_load_failure_policy", None) == "fail":
            log.warning("kv_load_failure_policy is 'fail': a load the store cannot finish (a chunk cleared by "
                        "an operator, a damaged disk file) fails that request; set "
                        "\"kv_load_failure_policy\": \"recompute\" in --kv-transfer-config to compute it instead")
        self.off = self.unsupported_parallelism  # set for good when the ranks say their store is off
        self._quiet_until = 0.0  # after a rank timed out, no lookups until then
        self.planner = Planner(self.config.chunk_size)
        self.ranks = RankClient(self._endpoints)
        url = self.config.controller_lookup_url
        self.controller = ControllerClient(url, self.config.controller_api_key) if url else None
        self._fetching: dict[str, float] = {}  # request id -> deadline of its P2P fetch
        self._fetched: set[str] = set()  # requests whose fetch ended (not tried again)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        try:
            return self._matched(request, num_computed_tokens)
        except Exception:
            self.stats["lookup_failures"] += 1
            log.exception("lookup of request %s failed; it is computed", request.request_id)
            return 0, False

    def _matched(self, request: Any, num_computed: int) -> tuple[Optional[int], bool]:
        request_id = request.request_id
        if self.off or time.monotonic() < self._quiet_until:
            self.planner.skipped(request_id)
            return 0, False
        why = _skips(request)
        if why is not None:
            self.stats["skipped"] += 1
            self.planner.skipped(request_id)
            return 0, False
        tokens = list(request.prompt_token_ids)
        if request_id in self._fetching:
            if not self._fetch_done(request_id):
                return None, False  # vLLM asks again next step
        self.stats["lookups"] += 1
        replies = self.ranks.ask({"op": "hold", "req": request_id, "tokens": tokens})
        if replies is None or any(r.get("off") for r in replies):
            self.planner.skipped(request_id)
            if replies is None:
                self.stats["lookup_failures"] += 1
                self._quiet_until = time.monotonic() + RANK_BACKOFF_SECONDS
            else:
                self.off = True
                log.error("lmcache_rs connector off: a rank's store did not start (see that worker's log)")
            return 0, False
        hit = min(int(r.get("tokens", 0)) for r in replies)
        if max(hit, num_computed) < len(tokens) - 1 and request_id not in self._fetched \
                and self._start_fetch(request_id, tokens, max(hit, num_computed)):
            return None, False
        self._fetched.discard(request_id)
        self.stats["hit_tokens"] += hit
        return self.planner.matched(request_id, tokens, num_computed, hit), False

    def _start_fetch(self, request_id: str, tokens: list[int], local: int) -> bool:
        """Ask the ranks to fetch a longer prefix from another instance; whether one started."""
        if self.controller is None:
            return False
        answer = self.controller.lookup(tokens)
        if not answer:
            return False
        best = max(((n, inst) for inst, (_loc, n) in answer.items() if inst != self.config.lmcache_instance_id),
                   default=None)
        if best is None or best[0] <= local:
            return False
        addresses = self.controller.p2p_addresses(best[1])
        world = self.config.world_size
        if addresses is None or any(rank not in addresses for rank in range(world)):
            self._warn("instance %s holds %d tokens of request %s but does not serve P2P on every rank",
                       best[1], best[0], request_id)
            return False
        sources = {rank: list(addresses[rank]) for rank in range(world)}
        replies = self.ranks.ask({"op": "fetch", "req": request_id, "tokens": tokens[: best[0]], "sources": sources})
        if replies is None:
            return False
        self.stats["fetches"] += 1
        self._fetching[request_id] = time.monotonic() + FETCH_SECONDS
        return True

    def _fetch_done(self, request_id: str) -> bool:
        replies = self.ranks.ask({"op": "fetch_state", "req": request_id})
        states = {r.get("state") for r in replies} if replies is not None else {"failed"}
        if "pending" in states and time.monotonic() < self._fetching[request_id]:
            return False
        if states != {"done"}:
            self.stats["fetch_failures"] += 1
            self._warn("P2P fetch for request %s ended %s; the local store's prefix is used", request_id,
                       sorted(s for s in states if s))
        del self._fetching[request_id]
        self._fetched.add(request_id)
        return True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.planner.allocated(request.request_id, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        try:
            new = [(r.req_id, r.prompt_token_ids, r.block_ids[0] if r.block_ids else [], r.num_computed_tokens,
                    scheduler_output.num_scheduled_tokens.get(r.req_id, 0))
                   for r in scheduler_output.scheduled_new_reqs]
            c = scheduler_output.scheduled_cached_reqs
            cached = []
            for i, req_id in enumerate(c.req_ids):
                blocks = c.new_block_ids[i]
                cached.append((req_id, blocks[0] if blocks else None, req_id in c.resumed_req_ids,
                               c.num_computed_tokens[i], scheduler_output.num_scheduled_tokens.get(req_id, 0)))
            return ConnectorPlan(self.planner.step(new, cached))
        except Exception:
            log.exception("building the connector's step plan failed; nothing is loaded or saved this step")
            return ConnectorPlan()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Optional[dict[str, Any]]]:
        self.planner.finished(request.request_id)
        self._fetching.pop(request.request_id, None)
        self._fetched.discard(request.request_id)
        return False, None  # saves complete within the step: the blocks can be freed now

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a lost save is a later cache miss, nothing more

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # save_kv_layer must run between the layers, which a full CUDA graph skips

    # ================================== worker side =========================================
    def _init_worker(self, vllm_config: "VllmConfig") -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self.rank = get_tensor_model_parallel_rank()
        model = vllm_config.model_config
        self.num_kv_heads = model.get_num_kv_heads(vllm_config.parallel_config)
        self.head_dim = model.get_head_size()
        self.worker: Any = None
        self.layer_index: dict[str, int] = {}
        self.views: list[layout.LayerViews] = []
        self._holds: dict[str, tuple[list[int], float]] = {}  # request -> (held keys, deadline)
        self._holds_lock = threading.Lock()
        self._fetch_states: dict[str, str] = {}
        self._load_errors: set[int] = set()
        self._staging: list[tuple[SaveSpec, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._layers_copied = 0  # this step's layers copied out for saving
        self._failed_loads: set[str] = set()  # this step's requests whose load failed: not saved
        self._side_stream: Any = None
        self.server = None
        if self.unsupported_parallelism:
            log.error("lmcache_rs connector off: pipeline (%d stages) and data parallelism (%d engines) are not "
                      "supported", vllm_config.parallel_config.pipeline_parallel_size,
                      vllm_config.parallel_config.data_parallel_size)
            return
        # bound before the store starts, so a store that fails to start answers "off" at once
        self.server = RankServer(self._endpoints[self.rank], self._answer)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.server is None:
            return
        try:
            self._start_worker(kv_caches)
        except layout.UnsupportedLayout as exc:
            log.error("lmcache_rs connector off on rank %d: %s", self.rank, exc)
        except Exception:
            log.exception("lmcache_rs connector off on rank %d: its store did not start", self.rank)
            if self.worker is not None:
                self.worker.close()
                self.worker = None

    def _cpu_isa(self, names: list[str]) -> Optional[str]:
        """The CPU attention kernel of the layers (vLLM sets ``layer.isa``), or None."""
        layers = self._vllm_config.compilation_config.static_forward_context
        isas = {getattr(layers.get(name), "isa", None) for name in names}
        return isas.pop() if len(isas) == 1 else None

    def _start_worker(self, kv_caches: dict[str, torch.Tensor]) -> None:
        kind, names, views = layout.describe(kv_caches, self.block_size, self.num_kv_heads, self.head_dim)
        if kind == "cpu" and self._cpu_isa(names) not in CPU_ISAS:
            raise layout.UnsupportedLayout(
                f"vLLM's CPU attention kernel here is {self._cpu_isa(names)!r}, which packs blocks in a layout "
                f"this connector does not read (it reads {', '.join(CPU_ISAS)}; float32 KV uses 'vec')")
        from lmcache_rs.worker import KVWorker
        from lmcache_rs.worker.store import dtype_name

        first = views[0].key
        config = dataclasses.replace(self.config, num_layers=len(names), num_kv_heads=self.num_kv_heads,
                                     head_dim=self.head_dim, kv_dtype=dtype_name(first.dtype))
        self.worker = KVWorker(config, worker_id=self.rank)
        self.layer_index = {name: i for i, name in enumerate(names)}
        self.views = views
        if first.device.type == "cuda":
            self._side_stream = torch.cuda.Stream(device=first.device)
        log.info("lmcache_rs connector on rank %d: %d layers, layout %s, %s %s, chunk_size %d, instance %s",
                 self.rank, len(names), kind, dtype_name(first.dtype), first.device, config.chunk_size,
                 config.lmcache_instance_id)

    # -- the rank channel (its own thread) ---------------------------------------------------
    def _answer(self, request: dict) -> dict:
        if self.worker is None:
            return {"off": True}
        op = request.get("op")
        if op == "hold":
            return {"tokens": self._hold(str(request["req"]), list(request["tokens"]))}
        if op == "fetch":
            self._fetch(str(request["req"]), list(request["tokens"]), request["sources"])
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

    def _release(self, request_id: str) -> None:
        with self._holds_lock:
            held = self._holds.pop(request_id, None)
        if held is not None and self.worker is not None:
            self.worker.kvstore.release(held[0])

    def _fetch(self, request_id: str, tokens: list[int], sources: dict) -> None:
        if len(self._fetch_states) > MAX_FETCH_STATES:  # ended fetches nobody asked about (timed out, aborted)
            for ended in [r for r, state in self._fetch_states.items() if state != "pending"]:
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

    # -- per step --------------------------------------------------------------------------
    def _plan(self) -> Optional[StepPlan]:
        if self.worker is None or not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta.step if isinstance(meta, ConnectorPlan) else None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        plan = self._plan()
        if plan is None:
            return
        for request_id in plan.releases:
            self._release(request_id)
        for spec in plan.loads:
            try:
                if not self._load(spec):
                    self._failed_loads.add(spec.request_id)
            except Exception:
                self.stats["load_failures"] += 1
                log.exception("loading %d tokens of request %s failed; its blocks are reported to vLLM",
                              spec.end - spec.start, spec.request_id)
                self._load_errors.update(self._blocks_of(spec.block_ids, spec.start, spec.end))
                self._failed_loads.add(spec.request_id)
            finally:
                self._release(spec.request_id)

    def _load(self, spec: LoadSpec) -> bool:
        """Write the planned tokens into the request's blocks; False (and the blocks not
        written reported to vLLM) when the store had less than promised."""
        matched, kv = self.worker.retrieve(spec.tokens)
        end = min(matched, spec.end)
        if end > spec.start:
            device = self.views[0].key.device
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

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        plan = self._plan()
        if plan is None or not plan.saves:
            return
        index = self.layer_index.get(layer_name)
        if index is None:
            return
        try:
            if self._layers_copied == 0 and not self._staging:
                self._stage([spec for spec in plan.saves if spec.request_id not in self._failed_loads])
            stream = self._side_stream
            if stream is not None:  # copy out on a side stream once this layer's attention is done
                stream.wait_stream(torch.cuda.current_stream(stream.device))
                with torch.cuda.stream(stream):
                    self._copy_layer(index)
            else:
                self._copy_layer(index)
            self._layers_copied += 1
        except Exception:
            self.stats["save_failures"] += 1
            log.exception("copying layer %s out for saving failed; this step saves nothing", layer_name)
            self._staging = []
            self._layers_copied = -len(self.views)  # never complete this step

    def _stage(self, saves: list[SaveSpec]) -> None:
        first = self.views[0].key
        for spec in saves:
            blocks, offsets = layout.slot_indices(spec.block_ids, self.block_size, spec.start, len(spec.tokens),
                                                  first.device)
            out = torch.empty((len(self.views), 2, blocks.numel(), self.num_kv_heads, self.head_dim),
                              dtype=first.dtype, device=first.device)
            self._staging.append((spec, blocks, offsets, out))

    def _copy_layer(self, index: int) -> None:
        views = self.views[index]
        for _spec, blocks, offsets, out in self._staging:
            out[index, 0] = views.key[blocks, offsets]
            out[index, 1] = views.value[blocks, offsets]

    def wait_for_save(self) -> None:
        staged, self._staging = self._staging, []
        copied, self._layers_copied = self._layers_copied, 0
        self._failed_loads = set()
        if not staged:
            return
        if copied != len(self.views):  # a layer never came by: the staged KV is incomplete
            self.stats["save_failures"] += 1
            self._warn("only %d of %d layers were copied out this step; nothing is saved", max(copied, 0),
                       len(self.views))
            return
        if self._side_stream is not None:
            self._side_stream.synchronize()
        for spec, _blocks, _offsets, out in staged:
            try:
                self.worker.store(spec.tokens, out, start=spec.start)
                self.stats["saved_tokens"] += len(spec.tokens) - spec.start
            except Exception:
                self.stats["save_failures"] += 1
                log.exception("saving %d tokens of request %s failed", len(spec.tokens) - spec.start,
                              spec.request_id)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._role == KVConnectorRole.SCHEDULER:
            self.ranks.close()
            if self.controller is not None:
                self.controller.close()
            log.info("lmcache_rs connector (scheduler): %s", self.stats)
            return
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.worker is not None:
            log.info("lmcache_rs connector (rank %d): %s", self.rank, self.stats)
            self.worker.close()
            self.worker = None
