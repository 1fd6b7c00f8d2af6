"""The vLLM connector's scheduler-side plan (lmcache_rs.vllm.plan), without vLLM: random
prompts, store hits and prefill schedules against a simple model of what must hold."""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_rs.vllm.plan import Planner, StepPlan

BLOCK = 4


@st.composite
def scenarios(draw):
    chunk = draw(st.sampled_from([4, 8, 12]))
    prompt_len = draw(st.integers(1, 60))
    hit = draw(st.integers(0, prompt_len))
    local = draw(st.integers(0, prompt_len - 1))
    local -= local % BLOCK  # vLLM presents a block-aligned local hit
    budgets = draw(st.lists(st.integers(1, 20), min_size=1, max_size=40))
    return chunk, prompt_len, hit, local, budgets


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_loads_and_saves_cover_exactly_what_they_must(scenario):
    chunk, prompt_len, hit, local, budgets = scenario
    prompt = list(range(1000, 1000 + prompt_len))
    planner = Planner(chunk)
    ext = planner.matched("r", prompt, local, hit)
    # a load never reaches the last prompt token and starts where vLLM's own cache ends
    assert ext == max(0, min(hit, prompt_len - 1) - local)
    planner.allocated("r", ext)
    computed = local + ext
    blocks = list(range(100, 100 + -(-prompt_len // BLOCK)))
    saved = [False] * prompt_len
    loads = []
    first = True
    for budget in budgets:
        if computed >= prompt_len:
            break
        scheduled = min(budget, prompt_len - computed)
        if first:
            plan = planner.step([("r", prompt, blocks, computed, scheduled)], [])
            first = False
        else:
            plan = planner.step([], [("r", None, False, computed, scheduled)])
        plan = pickle.loads(pickle.dumps(plan))  # crosses to the workers by pickle
        loads += plan.loads
        for save in plan.saves:
            assert save.start % chunk == 0  # chunk-aligned starts
            assert save.tokens == prompt[: len(save.tokens)]
            assert len(save.tokens) <= computed + scheduled  # only computed tokens
            # a save ends on a chunk boundary or at the prompt's end
            assert len(save.tokens) % chunk == 0 or len(save.tokens) == prompt_len
            for p in range(save.start, len(save.tokens)):
                saved[p] = True
        computed += scheduled
    if computed >= prompt_len:
        # everything the store did not hold as whole chunks gets saved, by prefill's end
        first_unheld = hit - hit % chunk if hit < prompt_len else prompt_len
        assert all(saved[first_unheld:])
    if ext:
        (load,) = loads
        assert (load.start, load.end) == (local, local + ext) and load.tokens == prompt[:hit]
        assert load.block_ids == blocks
    else:
        assert loads == []


def test_requests_that_load_nothing_or_leave_release_their_hold():
    planner = Planner(8)
    assert planner.matched("a", list(range(20)), 0, 16) == 16
    planner.allocated("a", 0)  # vLLM chose not to load (e.g. no free blocks)
    assert planner.matched("b", list(range(20)), 0, 16) == 16
    planner.allocated("b", 16)
    planner.finished("c")  # never planned (e.g. aborted while its fetch ran): its hold ends too
    plan = planner.step([("b", list(range(20)), [1, 2, 3, 4, 5], 16, 4)], [])
    assert plan.releases == ["a", "c"] and [load.request_id for load in plan.loads] == ["b"]
    planner.finished("b")
    assert planner.step([], []).releases == ["b"]
    assert not planner.step([], [])


def test_resumed_requests_take_their_new_blocks():
    planner = Planner(4)
    prompt = list(range(12))
    planner.matched("r", prompt, 0, 0)
    planner.allocated("r", 0)
    planner.step([("r", prompt, [7, 8], 0, 8)], [])
    plan = planner.step([], [("r", [9, 10, 11], True, 8, 4)])  # preempted, resumed with new blocks
    (save,) = plan.saves
    assert save.block_ids == [9, 10, 11] and save.start == 8 and save.tokens == prompt


def test_an_empty_plan_is_false():
    assert not StepPlan()


def test_a_request_resumed_after_preemption_loads_what_its_new_lookup_found():
    planner = Planner(8)
    prompt = list(range(40))
    planner.matched("r", prompt, 0, 0)
    planner.allocated("r", 0)
    planner.step([("r", prompt, [1, 2, 3, 4, 5], 0, 16)], [])  # 16 computed, then preempted
    # vLLM sets num_computed_tokens to 0 and looks the request up again: the store has its 16
    assert planner.matched("r", prompt, 0, 16) == 16
    planner.allocated("r", 16)
    plan = planner.step([], [("r", [6, 7, 8, 9, 10], True, 16, 24)])
    (load,) = plan.loads
    assert (load.start, load.end, load.block_ids, load.tokens) == (0, 16, [6, 7, 8, 9, 10], prompt[:16])
    (save,) = plan.saves
    assert save.start == 16 and save.tokens == prompt and save.block_ids == [6, 7, 8, 9, 10]


def test_skipped_requests_are_neither_loaded_nor_saved():
    planner = Planner(8)
    prompt = list(range(30))
    planner.skipped("lora")  # e.g. a LoRA request: no state at all
    plan = planner.step([("lora", prompt, [1, 2, 3, 4], 0, 30)], [])
    assert plan.loads == [] and plan.saves == []
    # a request looked up before, then skipped on a later lookup (e.g. the ranks went quiet)
    planner.matched("r", prompt, 0, 16)
    planner.skipped("r")
    plan = planner.step([("r", prompt, [1, 2, 3, 4], 0, 30)], [])
    assert plan.loads == [] and plan.saves == [] and plan.releases == ["r"]


def test_a_request_that_skips_saving_loads_but_saves_nothing():
    planner = Planner(8)
    prompt = list(range(30))
    assert planner.matched("quiet", prompt, 0, 16, save=False) == 16
    planner.allocated("quiet", 16)
    plans = [planner.step([("quiet", prompt, [1, 2, 3, 4, 5, 6, 7, 8], 0, 20)], []),
             planner.step([], [("quiet", None, False, 20, 10)])]
    assert [(x.start, x.end) for x in plans[0].loads] == [(0, 16)]
    assert all(x.saves == [] for x in plans)
    # the same prompt from a request that saves: its chunks past the hit are saved
    planner.matched("loud", prompt, 0, 16)
    planner.allocated("loud", 16)
    plan = planner.step([("loud", prompt, [1, 2, 3, 4, 5, 6, 7, 8], 0, 30)], [])
    assert [(x.start, len(x.tokens)) for x in plan.saves] == [(16, 30)]


def test_vllm_granting_fewer_tokens_than_offered_loads_exactly_those():
    planner = Planner(8)
    prompt = list(range(50))
    assert planner.matched("r", prompt, 0, 40) == 40
    planner.allocated("r", 32)  # trimmed to whole blocks
    (load,) = planner.step([("r", prompt, [1, 2, 3, 4, 5, 6, 7], 32, 18)], []).loads
    assert (load.start, load.end) == (0, 32)
    # more than offered: planned as granted, so the worker finds the store short and reports it
    planner.matched("s", prompt, 0, 16)
    planner.allocated("s", 24)
    (load,) = planner.step([("s", prompt, [1, 2, 3, 4, 5, 6, 7], 24, 26)], []).loads
    assert (load.start, load.end, len(load.tokens)) == (0, 24, 16)
