"""The connector's scheduler-side bookkeeping, free of vLLM types: which tokens of each request
to load from the store into vLLM's blocks, and which to save from them, step by step.

Rules:

* A load covers tokens ``[num_computed, hit)`` where ``hit`` is the store's prefix, capped at
  one token short of the prompt (vLLM must compute at least one token to sample from).
* Saves are chunk-aligned: while a prompt's prefill runs (possibly over several steps), each
  chunk is saved once it is fully computed; when the prefill ends the last, partial chunk is
  saved too. Chunks the store already held at lookup are not saved again. Generated tokens
  are never saved (only prompts are looked up).
* Every request the store promised tokens for holds them on the ranks until its load ran or
  the request left; the plan carries those releases to the ranks.

The plan crosses from the EngineCore process to the workers inside vLLM's SchedulerOutput,
so it is a plain picklable dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass
class LoadSpec:
    request_id: str
    tokens: list[int]  # the prompt up to the store's hit: what to retrieve
    block_ids: list[int]  # the request's blocks, in token order
    start: int  # write tokens [start, end) into the blocks
    end: int


@dataclass
class SaveSpec:
    request_id: str
    tokens: list[int]  # the prompt up to the last token to save
    block_ids: list[int]
    start: int  # first token to save, a chunk boundary


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)  # requests whose holds end

    def __bool__(self) -> bool:
        return bool(self.loads or self.saves or self.releases)


@dataclass
class RequestState:
    tokens: list[int]  # the prompt
    hit: int = 0  # tokens the store held at lookup
    load_start: int = 0
    load_end: int = 0
    load_pending: bool = False  # planned in get_num_new_matched_tokens, not yet sent
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0  # tokens [0, saved) need no saving (held, or saved already)
    done: bool = False  # prefill finished and saved
    save: bool = True  # the request's own choice (LMCache's ``lmcache.skip_save``)


class Planner:
    def __init__(self, chunk_size: int, save: bool = True, load: bool = True):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.save = save
        self.load = load
        self.requests: dict[str, RequestState] = {}
        self._releases: list[str] = []

    # -- lookup time ------------------------------------------------------------------------
    def matched(self, request_id: str, tokens: Sequence[int], num_computed: int, hit: int,
                save: bool = True) -> int:
        """Record the store's ``hit`` for a request; the tokens vLLM should load beyond its
        own ``num_computed``. ``save=False``: the request may load but saves nothing."""
        state = RequestState(list(tokens), hit=hit, save=save)
        state.saved = hit - hit % self.chunk_size if hit < len(tokens) else hit
        load_end = min(hit, len(tokens) - 1) if self.load else 0
        if load_end > num_computed:
            state.load_start, state.load_end = num_computed, load_end
        self.requests[request_id] = state
        return state.load_end - state.load_start

    def allocated(self, request_id: str, num_external: int) -> None:
        """vLLM allocated blocks and counts ``num_external`` tokens as loaded: exactly those
        are loaded (vLLM may grant fewer than offered, e.g. trimmed to whole blocks; more than
        offered reaches the worker as a load the store cannot fill, which it reports)."""
        state = self.requests.get(request_id)
        if state is None:
            return
        if num_external <= 0:
            state.load_start = state.load_end = 0
            state.load_pending = False
            self._releases.append(request_id)
        else:
            state.load_end = state.load_start + num_external
            state.load_pending = True

    def skipped(self, request_id: str) -> None:
        """A request the store must not serve: nothing planned for it (after a preemption it
        may come back here)."""
        if self.requests.pop(request_id, None) is not None:
            self._releases.append(request_id)

    def finished(self, request_id: str) -> None:
        """The request left: its state goes, and the ranks end its hold (if one was taken)."""
        self.requests.pop(request_id, None)
        self._releases.append(request_id)

    def release(self, request_id: str) -> None:
        """End a hold the ranks may have taken for a request planned nothing (e.g. another
        rank did not answer)."""
        self._releases.append(request_id)

    # -- each step ----------------------------------------------------------------------------
    def step(self, new: Sequence[tuple[str, Optional[Sequence[int]], Sequence[int], int, int]],
             cached: Sequence[tuple[str, Optional[Sequence[int]], bool, int, int]]) -> StepPlan:
        """The plan of one step. ``new``: (request id, prompt, block ids, num_computed,
        num_scheduled) of newly scheduled requests; ``cached``: (request id, new block ids,
        resumed, num_computed, num_scheduled) of continuing ones."""
        plan = StepPlan(releases=self._releases)
        self._releases = []
        for request_id, _prompt, block_ids, num_computed, num_scheduled in new:
            state = self.requests.get(request_id)
            if state is None:  # not looked up (skipped, or the lookup failed): neither loaded nor saved
                continue
            state.block_ids = list(block_ids)
            self._plan_load(plan, request_id, state)
            self._plan_save(plan, request_id, state, num_computed + num_scheduled)
        for request_id, new_block_ids, resumed, num_computed, num_scheduled in cached:
            state = self.requests.get(request_id)
            if state is None:
                continue
            if resumed:  # after a preemption: new blocks, and a new lookup may have planned a load
                state.block_ids = list(new_block_ids or [])
            elif new_block_ids:
                state.block_ids.extend(new_block_ids)
            self._plan_load(plan, request_id, state)
            self._plan_save(plan, request_id, state, num_computed + num_scheduled)
        return plan

    def _plan_load(self, plan: StepPlan, request_id: str, state: RequestState) -> None:
        if state.load_pending:
            plan.loads.append(LoadSpec(request_id, state.tokens[: state.hit], state.block_ids,
                                       state.load_start, state.load_end))
            state.load_pending = False

    def _plan_save(self, plan: StepPlan, request_id: str, state: RequestState, computed: int) -> None:
        if not (self.save and state.save) or state.done:
            return
        prompt_len = len(state.tokens)
        end = prompt_len if computed >= prompt_len else computed - computed % self.chunk_size
        if end >= prompt_len:
            state.done = True
        if end <= state.saved:
            return
        start = state.saved - state.saved % self.chunk_size
        plan.saves.append(SaveSpec(request_id, state.tokens[:end], state.block_ids, start))
        state.saved = end
