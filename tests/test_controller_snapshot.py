"""The controller's snapshot writer: one dump at a time, even when a periodic dump is cancelled
at shutdown while its thread is still writing (the final dump waits for it instead of
interleaving with it or being overwritten by it)."""

from __future__ import annotations

import asyncio
import threading
import time

from lmcache_rs import Index
from lmcache_rs.controller.server import Controller
from lmcache_rs.controller.settings import Settings


class SlowDumpIndex:
    """The native index, with dumps that take a while and record when they ran."""

    def __init__(self):
        self.inner = Index(256, 0)
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def dump(self, path):
        start = time.monotonic()
        time.sleep(0.3)
        self.inner.dump(path)
        with self.lock:
            self.spans.append((start, time.monotonic()))


def test_final_dump_waits_for_a_cancelled_periodic_dump(tmp_path):
    path = tmp_path / "index.snap"

    async def main():
        index = SlowDumpIndex()
        controller = Controller(Settings(snapshot=str(path), snapshot_interval=3600), index=index)
        index.inner.admit("inst", 0, "LocalCPUBackend", hashes=[1, 2, 3])
        controller.registry.changes += 1
        periodic = asyncio.ensure_future(controller._dump_snapshot())
        await asyncio.sleep(0.05)  # its thread is writing now
        periodic.cancel()
        await controller._dump_snapshot(force=True)
        return index.spans

    spans = asyncio.run(main())
    assert len(spans) == 2
    (first_start, first_end), (second_start, _) = spans
    assert second_start >= first_end, spans
    restored = Index(256, 0)
    restored.load(str(path))
    assert len(restored) == 3
