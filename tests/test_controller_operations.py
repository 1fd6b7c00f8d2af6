"""Operations' command connections: one connect per worker, shared by every request that needs
it, whatever happens to any one of them. The worker side is a real wire server on loopback; only
the moment the connect completes is held back (a gate in front of the real connect)."""

from __future__ import annotations

import asyncio

import pytest

from lmcache_rs.controller import operations as operations_module
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.operations import EventTracker, Operations
from lmcache_rs.controller.registry import Registry, WorkerRecord
from lmcache_rs.wire import SessionError, serve
from lmcache_rs.wire import connect as real_connect
from py_index import PyIndex


class Setup:
    async def start(self, monkeypatch, fail_first: bool = False):
        self.server = await serve("127.0.0.1", 0, {"health": lambda args: {"ok": True}})
        port = self.server.sockets[0].getsockname()[1]
        self.gate = asyncio.Event()
        self.connects = 0

        async def gated_connect(host, p, **kwargs):
            self.connects += 1
            await self.gate.wait()
            if fail_first and self.connects == 1:
                raise ConnectionRefusedError("refused")
            return await real_connect(host, p, **kwargs)

        monkeypatch.setattr(operations_module, "connect", gated_connect)
        self.registry = Registry(PyIndex(256, 0), Metrics(), 10.0)
        self.record = WorkerRecord("inst", 0)
        self.record.host, self.record.worker_port = "127.0.0.1", port
        self.registry.workers[self.record.key] = self.record
        self.ops = Operations(self.registry, 256, 5.0, EventTracker(100))
        return self

    async def close(self):
        if self.record.command is not None:
            self.record.command.close()
        self.server.close()
        await self.server.wait_closed()


def test_callers_share_one_connect_and_a_cancelled_one_does_not_fail_the_others(monkeypatch):
    async def main():
        s = await Setup().start(monkeypatch)
        first = asyncio.ensure_future(s.ops.call(s.record, "health"))
        second = asyncio.ensure_future(s.ops.call(s.record, "health"))
        await asyncio.sleep(0.01)
        first.cancel()  # its HTTP client hung up
        await asyncio.sleep(0.01)
        s.gate.set()
        assert await asyncio.wait_for(second, 5) == {"ok": True}
        assert first.cancelled() and s.connects == 1 and s.record.command is not None
        assert await s.ops.call(s.record, "health") == {"ok": True} and s.connects == 1  # reused
        await s.close()

    asyncio.run(main())


def test_every_caller_hears_of_a_worker_removed_while_connecting(monkeypatch):
    async def main():
        s = await Setup().start(monkeypatch)
        callers = [asyncio.ensure_future(s.ops.call(s.record, "health")) for _ in range(3)]
        await asyncio.sleep(0.01)
        s.registry.remove(s.record, "said bye")
        s.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
        assert all(isinstance(r, SessionError) and "went away" in str(r) for r in results), results
        assert s.record.command is None and s.ops._connecting == {} and not s.ops.tasks
        await s.close()

    asyncio.run(main())


def test_a_failed_connect_fails_its_callers_and_the_next_call_connects_again(monkeypatch):
    async def main():
        s = await Setup().start(monkeypatch, fail_first=True)
        callers = [asyncio.ensure_future(s.ops.call(s.record, "health")) for _ in range(2)]
        await asyncio.sleep(0.01)
        s.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*callers, return_exceptions=True), 5)
        assert all(isinstance(r, ConnectionRefusedError) for r in results), results
        assert await asyncio.wait_for(s.ops.call(s.record, "health"), 5) == {"ok": True}
        assert s.connects == 2
        await s.close()

    asyncio.run(main())


def test_controller_stop_cancels_a_pending_connect(monkeypatch):
    from lmcache_rs.controller.server import Controller
    from lmcache_rs.controller.settings import Settings

    async def main():
        s = await Setup().start(monkeypatch)
        controller = Controller(Settings(port=0, monitor_port=0))
        await controller.start()
        record = WorkerRecord("inst", 0)
        record.host, record.worker_port = s.record.host, s.record.worker_port
        controller.registry.workers[record.key] = record
        caller = asyncio.ensure_future(controller.ops.call(record, "health"))
        await asyncio.sleep(0.01)
        assert len(controller.ops.tasks) == 1  # the connect, held at the gate
        await asyncio.wait_for(controller.stop(), 10)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 5)
        assert not controller.ops.tasks and record.command is None
        await s.close()

    asyncio.run(main())
