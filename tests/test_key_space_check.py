"""The LMCache key-space check: a controller whose NONE_HASH differs from its LMCache workers'
warns (once) and shows ``mismatch`` in /metrics; a correctly configured one confirms itself
and warns never. A real controller in process, an LMCache worker's messages through the real
ZMQ sockets, lookups over HTTP; the check's ticks are driven by the test."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import urllib.request

import pytest

from lmcache_rs import lmcache_chunk_hashes
from lmcache_rs.controller.server import Controller
from lmcache_rs.controller.settings import Settings
from lmcache_worker_client import report_admits

CHUNK = 4
NEEDED = 5
OURS = 0  # the controller's NONE_HASH
WRONG = -6197052367682486848  # a vLLM worker's NONE_HASH under another setting


def _post(port: int, tokens: list[int]) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/lookup", data=json.dumps({"tokens": tokens}).encode())
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["layout_info"]


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


class Deployment:
    """One controller and one LMCache worker whose keys start from ``worker_none_hash``."""

    def __init__(self, worker_none_hash: int):
        self.worker_none_hash = worker_none_hash
        # the check's own timer never fires here: the test calls tick()
        self.controller = Controller(Settings(port=0, monitor_port=0, monitor_ports={"pull": 0, "reply": 0},
                                              chunk_size=CHUNK, none_hash=OURS, lmcache_key_check_lookups=NEEDED,
                                              lmcache_key_check_interval=3600))
        self.check = self.controller.key_space_check
        rng = random.Random(1)
        self.prompts = [[rng.randrange(1, 50000) for _ in range(3 * CHUNK + 1)] for _ in range(20)]

    async def start(self) -> None:
        await self.controller.start()
        self.port = self.controller.http_port
        keys = [k for p in self.prompts for k in lmcache_chunk_hashes(p, CHUNK, self.worker_none_hash)]
        await report_admits(self.controller, "lmc", 0, [("LocalCPUBackend", keys)])

    async def lookup(self, tokens: list[int]) -> dict:
        return await asyncio.to_thread(_post, self.port, tokens)

    async def metrics(self) -> str:
        return await asyncio.to_thread(_get, self.port, "/metrics")

    async def rounds(self, n: int, tokens_of=lambda p: p) -> None:
        """n ticks, each followed by one lookup (sampled) of the next prompt."""
        for i in range(n):
            self.check.tick()
            await self.lookup(tokens_of(self.prompts[i % len(self.prompts)]))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "key space" in r.getMessage()]


def test_wrong_none_hash_warns_once_and_shows_in_metrics(caplog):
    caplog.set_level(logging.INFO)

    async def main():
        d = Deployment(worker_none_hash=WRONG)
        await d.start()
        try:
            assert await d.lookup(d.prompts[0]) == {}  # the symptom: held, never found
            # a lookup sampled after tick k is checked at tick k + 2: NEEDED - 1 checked so far
            await d.rounds(NEEDED + 1)
            assert d.check.state == "unconfirmed" and not _warnings(caplog)
            await d.rounds(1)
            assert d.check.state == "mismatch" and d.check.unmatched == NEEDED
            await d.rounds(3)
            (warning,) = _warnings(caplog)
            for cause in ("PYTHONHASHSEED", "--none-hash", "--chunk-size", "--worker-python", f"NONE_HASH={OURS}"):
                assert cause in warning
            text = await d.metrics()
            assert 'lmcache_lmcache_key_space{state="mismatch"} 1.0\n' in text
            assert 'lmcache_lmcache_key_space{state="matched"} 0.0\n' in text
            assert f"lmcache_lmcache_key_space_unmatched_lookups {NEEDED + 3:.1f}\n" in text
        finally:
            await d.controller.stop()

    asyncio.run(main())


def test_right_settings_confirm_and_never_warn(caplog):
    caplog.set_level(logging.INFO)

    async def main():
        d = Deployment(worker_none_hash=OURS)
        await d.start()
        try:
            assert await d.lookup(d.prompts[0]) == {"lmc": ["LocalCPUBackend", 3 * CHUNK + 1]}
            await d.rounds(2)  # the first sample is checked at the second tick
            d.check.tick()
            assert d.check.state == "matched" and d.check.unmatched == 0
            # confirmed for good: no more samples are asked for, the fast path takes every lookup
            await d.rounds(3 * NEEDED, tokens_of=lambda p: [7] * len(p))
            assert all(lookup.take_sample() is None for lookup in d.check.lookups)
            assert d.check.state == "matched" and not _warnings(caplog)
            text = await d.metrics()
            assert 'lmcache_lmcache_key_space{state="matched"} 1.0\n' in text
            assert 'lmcache_lmcache_key_space{state="mismatch"} 0.0\n' in text
        finally:
            await d.controller.stop()

    asyncio.run(main())


@pytest.mark.parametrize("case", ["short lookups", "nothing held"])
def test_no_evidence_no_warning(caplog, case):
    """Lookups shorter than a chunk, or while LMCache workers hold nothing, prove nothing."""
    caplog.set_level(logging.INFO)

    async def main():
        d = Deployment(worker_none_hash=WRONG)
        if case == "nothing held":
            await d.controller.start()
            d.port = d.controller.http_port
            await d.rounds(3 * NEEDED)
            assert all(lookup.take_sample() is None for lookup in d.check.lookups)  # none asked for
        else:
            await d.start()
            await d.rounds(3 * NEEDED, tokens_of=lambda p: p[: CHUNK - 1])
        try:
            assert d.check.state == "unconfirmed" and d.check.unmatched == 0 and not _warnings(caplog)
        finally:
            await d.controller.stop()

    asyncio.run(main())
