"""A vLLM rank's side of the connector (lmcache_rs.vllm.rank_store), without vLLM: a real
KVWorker on CPU caches laid out as vLLM's CPU attention lays them out, driven through the
steps vLLM drives (hold over the rank channel, start_step, copy_layer per layer, finish_step)."""

from __future__ import annotations

import time

import pytest
import torch

from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.vllm import layout
from lmcache_rs.vllm.plan import LoadSpec, Planner, SaveSpec, StepPlan
from lmcache_rs.vllm.rank_store import RankStore
from lmcache_rs.worker import KVWorker

NB, H, N, D, L = 12, 2, 4, 8, 3  # blocks, kv heads, block size, head dim, layers
CHUNK = 8


def caches(seed: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed or 0)
    make = (lambda: torch.randn((NB, H, N, 2 * D), generator=g)) if seed is not None else \
        (lambda: torch.zeros((NB, H, N, 2 * D)))
    return {f"model.layers.{i}.self_attn.attn": make() for i in range(L)}


def config(**extra):
    return config_from_dict({"chunk_size": CHUNK, "max_local_cpu_size": 64 * L * 2 * CHUNK * H * D * 4 / GB,
                             "lmcache_instance_id": "rank-test", **extra})


def kv_of(kv_caches: dict[str, torch.Tensor], block_ids: list[int], start: int, end: int) -> torch.Tensor:
    _, _, views = layout.describe(kv_caches, N, H, D)
    blocks, offsets = layout.slot_indices(block_ids, N, start, end, torch.device("cpu"))
    return layout.gather(views, blocks, offsets)


def run_step(rank: RankStore, plan: StepPlan, names) -> None:
    rank.start_step(plan)
    for name in names:  # vLLM calls save_kv_layer after each layer's attention
        rank.copy_layer(name, plan)
    rank.finish_step()


@pytest.fixture
def pair():
    computed, empty = caches(seed=1), caches()
    a = RankStore(config(), 0, N, computed, H, D, cpu_isa="vec")
    yield a, computed, empty
    a.close()


def test_a_prompt_saved_from_one_cache_loads_bit_for_bit_into_another(pair):
    a, computed, empty = pair
    prompt = list(range(100, 122))  # 22 tokens: two full chunks and a partial one
    blocks = [7, 2, 9, 0, 5, 11]
    planner = Planner(CHUNK)
    planner.matched("r", prompt, 0, a.answer({"op": "hold", "req": "r", "tokens": prompt})["tokens"])
    planner.allocated("r", 0)
    run_step(a, planner.step([("r", prompt, blocks, 0, len(prompt))], []), list(computed))
    assert a.worker.lookup(prompt) == 22 and a.stats["saved_tokens"] == 22
    # another engine (same worker store: what a restarted or second request sees) loads it
    b = RankStore(config(lmcache_instance_id="other"), 0, N, empty, H, D, cpu_isa="vec")
    try:
        kv = a.worker.retrieve(prompt)[1]
        assert b.worker.store(prompt, kv) == 22
        planner = Planner(CHUNK)
        hit = b.answer({"op": "hold", "req": "s", "tokens": prompt})["tokens"]
        assert hit == 22 and planner.matched("s", prompt, 0, hit) == 21  # one token left to compute
        planner.allocated("s", 21)
        other_blocks = [3, 4, 1, 8, 6, 10]
        run_step(b, planner.step([("s", prompt, other_blocks, 21, 1)], []), list(empty))
        assert torch.equal(kv_of(empty, other_blocks, 0, 21), kv_of(computed, blocks, 0, 21))
        assert torch.count_nonzero(kv_of(empty, other_blocks, 21, 22)) == 0  # the last token is vLLM's
        assert b.take_load_errors() == set() and b.stats["loaded_tokens"] == 21
    finally:
        b.close()


def test_a_load_the_store_cannot_fill_reports_its_blocks_and_the_request_is_never_saved(pair):
    a, computed, _ = pair
    prompt = list(range(300, 324))
    blocks = [0, 1, 2, 3, 4, 5]
    planner = Planner(CHUNK)
    planner.matched("w", prompt, 0, 0)
    planner.allocated("w", 0)
    run_step(a, planner.step([("w", prompt, blocks, 0, 24)], []), list(computed))
    longer = prompt + list(range(900, 908))
    hit = a.answer({"op": "hold", "req": "r", "tokens": longer})["tokens"]
    assert hit == 24
    a.worker.clear()  # an operator's /clear between the lookup and the load
    other = [6, 7, 8, 9, 10, 11, 0, 1]
    plan = StepPlan(loads=[LoadSpec("r", prompt, other, 0, 24)], saves=[SaveSpec("r", prompt, other, 0)])
    run_step(a, plan, list(computed))
    assert a.take_load_errors() == {6, 7, 8, 9, 10, 11} and a.take_load_errors() == set()
    # the blocks hold no KV of these tokens: none of it may be stored under their keys
    assert a.worker.lookup(prompt) == 0 and a.stats["load_failures"] == 1 and a.stats["save_failures"] == 0
    # nor the next chunk, computed on top of it in a later step
    run_step(a, StepPlan(saves=[SaveSpec("r", longer, other, 24)]), list(computed))
    assert a.worker.kvstore.cpu.entries == {}
    # once the request is released the id may be reused and saved
    run_step(a, StepPlan(releases=["r"], saves=[SaveSpec("r", prompt, blocks, 0)]), list(computed))
    assert a.worker.lookup(prompt) == 24


def test_a_failed_load_on_one_rank_stops_the_others_saving_the_request():
    from lmcache_rs.vllm.rank_channel import RankClient, RankServer, channel_path

    path = channel_path(f"peer-test-{time.monotonic_ns()}", 0, 1)
    peer = RankStore(config(lmcache_instance_id="tp", world_size=2), 1, N, caches(seed=2), H, D, cpu_isa="vec")
    server = RankServer(path, peer.answer)
    failing = RankStore(config(lmcache_instance_id="tp", world_size=2), 0, N, caches(), H, D, cpu_isa="vec",
                        peers=RankClient([path], timeout=5))
    try:
        prompt = list(range(40, 56))
        assert peer.worker.store(prompt, torch.randn((L, 2, 16, H, D))) == 16  # the peer's load succeeds
        plan = StepPlan(loads=[LoadSpec("r", prompt, [0, 1, 2, 3], 0, 16)],  # rank 0's store has nothing
                        saves=[SaveSpec("r", prompt + [1, 2, 3, 4], [0, 1, 2, 3, 4], 16)])
        failing.start_step(plan)  # before the forward: the peer is told
        run_step(peer, plan, list(caches(seed=2)))
        assert failing.take_load_errors() == {0, 1, 2, 3} and peer.take_load_errors() == set()
        assert peer.stats["loaded_tokens"] == 16
        # the peer's new tokens were computed with rank 0's missing KV: it saves nothing of them
        assert peer.worker.lookup(prompt + [1, 2, 3, 4]) == 16 and peer.stats["saved_tokens"] == 0
    finally:
        failing.close()
        server.close()
        peer.close()


def test_a_step_in_which_a_layer_was_not_copied_saves_nothing(pair):
    a, computed, _ = pair
    prompt = list(range(500, 516))
    plan = StepPlan(saves=[SaveSpec("r", prompt, [0, 1, 2, 3], 0)])
    free = a.worker.kvstore.cpu.free_slots
    a.start_step(plan)
    a.copy_layer("model.layers.0.self_attn.attn", plan)  # the other layers never come
    a.finish_step()
    assert a.worker.lookup(prompt) == 0 and a.stats["save_failures"] == 1
    assert a.worker.kvstore.cpu.free_slots == free  # the slots it had reserved are given back
    run_step(a, plan, list(computed))  # the next complete step saves
    assert a.worker.lookup(prompt) == 16


def test_holds_keep_chunks_until_released_or_replaced(pair):
    a, computed, _ = pair
    prompt = list(range(700, 716))
    plan = StepPlan(saves=[SaveSpec("w", prompt, [0, 1, 2, 3], 0)])
    run_step(a, plan, list(computed))
    keys = a.worker.chunk_keys(prompt)
    assert a.answer({"op": "hold", "req": "r", "tokens": prompt})["tokens"] == 16
    assert a.answer({"op": "hold", "req": "r", "tokens": prompt})["tokens"] == 16  # asked again: replaced
    store = a.worker.kvstore
    assert all(store.is_pinned(k) is False and k not in store.cpu.lru for k in keys)  # held, not pinned
    a.start_step(StepPlan(releases=["r"]))
    a.finish_step()
    assert all(k in store.cpu.lru for k in keys)  # one release ends the (single, replaced) hold
    store.check()


def test_a_fetch_asked_over_the_channel_lands_in_the_store():
    peer = KVWorker(config(lmcache_instance_id="peer", num_layers=L, num_kv_heads=H, head_dim=D, kv_dtype="float32",
                           p2p_host="127.0.0.1", p2p_init_ports=0))
    rank = RankStore(config(), 0, N, caches(), H, D, cpu_isa="vec")
    try:
        prompt = list(range(900, 920))
        peer.store(prompt, torch.randn((L, 2, 20, H, D)))
        assert rank.answer({"op": "fetch", "req": "r", "tokens": prompt, "sources": {0: ["127.0.0.1", peer.p2p_port]}}) == {}
        deadline = time.monotonic() + 30
        while (state := rank.answer({"op": "fetch_state", "req": "r"})["state"]) == "pending":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert state == "done" and rank.answer({"op": "hold", "req": "r", "tokens": prompt})["tokens"] == 20
        assert rank.answer({"op": "fetch", "req": "x", "tokens": prompt, "sources": {1: ["h", 1]}}) == {}
        assert rank.answer({"op": "fetch_state", "req": "x"})["state"] == "failed"  # no source for rank 0
        with pytest.raises(ValueError, match="unknown op"):
            rank.answer({"op": "nope"})
    finally:
        rank.close()
        peer.close()


def test_caches_it_cannot_read_are_refused():
    with pytest.raises(layout.UnsupportedLayout, match="'amx'"):
        RankStore(config(), 0, N, caches(), H, D, cpu_isa="amx")
    with pytest.raises(layout.UnsupportedLayout, match="none of the known"):
        RankStore(config(), 0, N, {"mla": torch.zeros((NB, N, 64))}, H, D, cpu_isa="vec")


def test_the_presence_table_tells_the_scheduler_of_misses_without_asking(tmp_path):
    from lmcache_rs.vllm.presence import PresenceReader

    path = str(tmp_path / "rank0.keys")
    computed = caches(seed=4)
    a = RankStore(config(), 0, N, computed, H, D, cpu_isa="vec", presence_path=path)
    try:
        reader = PresenceReader([path], CHUNK, a.worker.kvstore.seed)
        saved, other = list(range(800, 820)), list(range(900, 920))
        assert reader.surely_missing(saved) and reader.surely_missing(other)
        run_step(a, StepPlan(saves=[SaveSpec("w", saved, [0, 1, 2, 3, 4], 0)]), list(computed))
        assert not reader.surely_missing(saved) and not reader.surely_missing(saved + [1, 2])
        assert reader.surely_missing(other)
        assert a.answer({"op": "hold", "req": "r", "tokens": saved})["tokens"] == 20
        a.start_step(StepPlan(releases=["r"]))
        a.worker.clear()
        assert reader.surely_missing(saved)
    finally:
        a.close()
    assert not (tmp_path / "rank0.keys").exists()


def test_a_table_whose_rank_is_gone_is_removed_by_the_next_rank_and_a_live_one_is_kept(tmp_path):
    import os

    from lmcache_rs.vllm.presence import PresenceTable

    def name(engine: str) -> str:
        return str(tmp_path / f"lmcache_rs-{os.getuid()}-{engine}-dp0-r0.keys")

    live = PresenceTable(name("live"))
    live.publish()
    (tmp_path / os.path.basename(name("dead"))).write_bytes(b"\0" * 16)  # left by a killed rank: unlocked
    new = PresenceTable(name("new"))
    try:
        assert os.path.exists(name("live")) and not os.path.exists(name("dead"))
    finally:
        new.close()
        live.close()
