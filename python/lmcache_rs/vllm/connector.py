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
until they are loaded, unless the ranks' presence tables already say that a rank holds none
of it (presence.py: a miss then costs no round trip); when the local store has less than
another instance per the controller's ``/lookup`` (``controller_lookup_url``), it has the
ranks fetch that prefix from the other instance's P2P ports first (the request waits a step
or more meanwhile, then loads locally). Worker side (rank_store.py): loads planned tokens
into vLLM's blocks before the forward, copies newly computed prompt tokens out per layer
during it and stores them in ``wait_for_save``.

Nothing here raises into vLLM: a failed lookup, fetch or save is logged and counted, and
planned no load means vLLM computes. Requests with a LoRA adapter, a cache salt,
multimodal inputs or prompt embeddings are neither loaded nor saved (the store's keys are
token ids alone).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache_rs.config import LMCacheConfig, load_config
from lmcache_rs.log_limit import RateLimitedLog

from . import layout, timing
from .controller_client import ControllerClient
from .plan import Planner, StepPlan
from .presence import PresenceReader, table_path
from .rank_channel import RankClient, RankServer, channel_path

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger("lmcache_rs.vllm")

# How long a request waits for a P2P fetch before it is computed instead.
FETCH_SECONDS = 30.0
# After a rank did not answer a lookup, new requests are computed without asking for this long.
RANK_BACKOFF_SECONDS = 5.0



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


def _saves(request: Any) -> bool:
    """Whether the request lets its prompt be saved: LMCache's per-request ``lmcache.skip_save``
    in ``SamplingParams(extra_args={"kv_transfer_params": {...}})`` says no."""
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    params = extra.get("kv_transfer_params") if isinstance(extra, Mapping) else None
    return not (isinstance(params, Mapping) and params.get("lmcache.skip_save"))  # any true value, as LMCache


class LMCacheRsConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.config = connector_config(vllm_config)
        self.block_size = vllm_config.cache_config.block_size
        # pipeline stages and data-parallel engines would share the ranks' ports (base + TP
        # rank) and instance id: not supported, the connector stays off
        parallel = vllm_config.parallel_config
        self.unsupported_parallelism = parallel.pipeline_parallel_size > 1 or parallel.data_parallel_size > 1
        # a drafter's layers are registered too but never run under a plan: no step would be complete
        self.speculative = vllm_config.speculative_config is not None
        self.stats: dict[str, int] = {  # the scheduler side's; each rank's are in its RankStore
            "lookups": 0, "known_misses": 0, "hit_tokens": 0, "lookup_failures": 0, "fetches": 0,
            "fetch_failures": 0, "skipped": 0, "skip_save": 0,
        }
        self._warn = RateLimitedLog(log, burst=5, period=30.0)
        engine, dp_rank = _engine_id(vllm_config)
        world = self.config.world_size
        self._endpoints = [channel_path(engine, dp_rank, rank) for rank in range(world)]
        self._tables = [table_path(engine, dp_rank, rank) for rank in range(world)]
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
        self.off = self.unsupported_parallelism or self.speculative  # also set for good when a rank says "off"
        self._quiet_until = 0.0  # after a rank timed out, no lookups until then
        self.planner = Planner(self.config.chunk_size)
        self.ranks = RankClient(self._endpoints)
        self.presence = PresenceReader(self._tables, self.config.chunk_size, self.config.hash_seed)
        url = self.config.controller_lookup_url
        self.controller = ControllerClient(url, self.config.controller_api_key) if url else None
        self._fetching: dict[str, float] = {}  # request id -> deadline of its P2P fetch
        self._fetched: set[str] = set()  # requests whose fetch ended (not tried again)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[Optional[int], bool]:
        started = timing.now()
        try:
            matched = self._matched(request, num_computed_tokens)
        except Exception:
            self.stats["lookup_failures"] += 1
            log.exception("lookup of request %s failed; it is computed", request.request_id)
            matched = 0, False
        timing.add("lookup_hit" if matched[0] else "lookup_miss", timing.now() - started)
        return matched

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
        if self.presence.surely_missing(tokens):
            self.stats["known_misses"] += 1
            hit = 0
        else:
            hit = self._hold(request_id, tokens)
            if hit is None:
                return 0, False
        if max(hit, num_computed) < len(tokens) - 1 and request_id not in self._fetched \
                and self._start_fetch(request_id, tokens, max(hit, num_computed)):
            return None, False
        self._fetched.discard(request_id)
        self.stats["hit_tokens"] += hit
        save = _saves(request)
        self.stats["skip_save"] += not save
        return self.planner.matched(request_id, tokens, num_computed, hit, save), False

    def _hold(self, request_id: str, tokens: list[int]) -> Optional[int]:
        """The prefix every rank holds (and now holds for this request), or None when a rank
        did not answer or is off (the request is then computed)."""
        replies = self.ranks.ask({"op": "hold", "req": request_id, "tokens": tokens})
        if replies is None or any(r.get("off") for r in replies):
            self.planner.skipped(request_id)
            self.planner.release(request_id)  # ranks that did answer hold the prefix
            if replies is None:
                self.stats["lookup_failures"] += 1
                self._quiet_until = time.monotonic() + RANK_BACKOFF_SECONDS
            else:
                self.off = True
                log.error("lmcache_rs connector off: a rank's store did not start (see that worker's log)")
            return None
        return min(int(r.get("tokens", 0)) for r in replies)

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
        started = timing.now()
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
            plan = ConnectorPlan(self.planner.step(new, cached))
        except Exception:
            log.exception("building the connector's step plan failed; nothing is loaded or saved this step")
            plan = ConnectorPlan()
        timing.add("plan", timing.now() - started)
        return plan

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
        self.rank_store: Any = None  # rank_store.RankStore once register_kv_caches succeeded
        self.server = None
        if self.unsupported_parallelism or self.speculative:
            log.error("lmcache_rs connector off: pipeline (%d stages) and data parallelism (%d engines) and "
                      "speculative decoding (%s) are not supported", vllm_config.parallel_config.pipeline_parallel_size,
                      vllm_config.parallel_config.data_parallel_size, "on" if self.speculative else "off")
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

    def _cpu_isa(self, names: list[str]) -> Optional[str]:
        """The CPU attention kernel of the layers (vLLM sets ``layer.isa``), or None."""
        layers = self._vllm_config.compilation_config.static_forward_context
        isas = {getattr(layers.get(name), "isa", None) for name in names}
        return isas.pop() if len(isas) == 1 else None

    def _start_worker(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from .rank_store import RankStore  # imports torch and the worker: only in vLLM's worker processes

        others = [endpoint for rank, endpoint in enumerate(self._endpoints) if rank != self.rank]
        self.rank_store = RankStore(self.config, self.rank, self.block_size, kv_caches, self.num_kv_heads,
                                    self.head_dim, self._cpu_isa(list(kv_caches)),
                                    peers=RankClient(others) if others else None,
                                    presence_path=self._tables[self.rank])

    def _answer(self, request: dict) -> dict:
        """The rank channel's requests (its own thread)."""
        if self.rank_store is None:
            return {"off": True}
        return self.rank_store.answer(request)

    def _plan(self) -> Optional[StepPlan]:
        if self.rank_store is None or not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta.step if isinstance(meta, ConnectorPlan) else None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        started = timing.now()
        plan = self._plan()
        if plan is not None and self.rank_store is not None:
            self.rank_store.start_step(plan)
        timing.add("start_step", timing.now() - started)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads finish in start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        started = timing.now()
        plan = self._plan()
        if plan is not None and self.rank_store is not None:
            self.rank_store.copy_layer(layer_name, plan)
        timing.add("save_layer", timing.now() - started)

    def wait_for_save(self) -> None:
        started = timing.now()
        if self.rank_store is not None:
            self.rank_store.finish_step()
        timing.add("finish_step", timing.now() - started)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.rank_store.take_load_errors() if self.rank_store is not None else set()

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
        if self.rank_store is not None:
            self.rank_store.close()
            self.rank_store = None
