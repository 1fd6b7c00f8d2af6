"""/clear against a worker that stores again right after clearing: the controller's index must
end up with what the worker holds. The worker reports its evictions in order with its other
events and names the report frame in its reply; the controller waits for that frame instead of
clearing its index itself (which would also wipe the chunks stored after the clear)."""

from __future__ import annotations

import asyncio

from fake_worker import ControllerProcess, FakeWorker, HttpClient, run_with_workers
from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.worker import KVWorker, synthetic_kv

CPU = "LocalCPUBackend"
HOST = "127.0.0.1"


class StoresAfterClear(FakeWorker):
    """Clears, then (before its reply goes out) reports a newly stored prompt."""

    new_tokens: list[int] = []

    def _clear(self, args):
        self.commands.append(("clear", args))
        location = args.get("location")
        ops = [("evict", loc, sorted(keys)) for loc, keys in self.holdings.items()
               if (location is None or loc == location) and keys]
        self.send_events(ops)
        self.admit_tokens(CPU, self.new_tokens)
        reply = {"cleared": sum(len(k) for _, _, k in ops)}
        if self.clear_reports_seq:
            reply["seq"] = self.seq
        return reply


def test_chunks_stored_after_the_clear_stay_visible():
    with ControllerProcess() as proc:

        async def main():
            w = StoresAfterClear("inst", 0, proc.monitor_port)
            w.new_tokens = list(range(1000, 1512))
            await w.start()
            old = list(range(512))
            w.admit_tokens(CPU, old)
            await w.barrier()
            async with HttpClient(HOST, proc.http_port) as http:
                status, body = await http.json("POST", "/clear", {"instance_id": "inst", "location": CPU})
                assert status == 200 and body["num_tokens"] == 512
                # no barrier: the clear is visible when /clear returns, and so is the new prompt
                _, old_answer = await http.json("POST", "/lookup", {"tokens": old})
                _, new_answer = await http.json("POST", "/lookup", {"tokens": w.new_tokens})
            await w.close()
            return old_answer, new_answer

        old_answer, new_answer = run_with_workers(main())
        assert old_answer["layout_info"] == {}
        assert new_answer["layout_info"] == {"inst": [CPU, 512]}


def test_a_worker_that_names_no_report_frame_is_cleared_by_the_controller():
    with ControllerProcess() as proc:

        async def main():
            w = FakeWorker("inst", 0, proc.monitor_port)
            w.clear_reports_seq = False
            await w.start()
            tokens = list(range(512))
            w.admit_tokens(CPU, tokens)
            await w.barrier()
            w.holdings.clear()  # it forgets its chunks without reporting: only the controller's clear shows it
            async with HttpClient(HOST, proc.http_port) as http:
                status, _ = await http.json("POST", "/clear", {"instance_id": "inst", "location": None})
                _, answer = await http.json("POST", "/lookup", {"tokens": tokens})
            await w.close()
            return status, answer

        status, answer = run_with_workers(main())
        assert status == 200 and answer["layout_info"] == {}


def test_real_worker_storing_right_after_its_clear():
    shape = dict(num_layers=2, num_kv_heads=2, head_dim=8)
    with ControllerProcess(config={"chunk_size": 4}) as proc:
        config = config_from_dict({
            "chunk_size": 4, "max_local_cpu_size": 64 * 256 / GB, **shape, "enable_controller": True,
            "controller_pull_url": f"{HOST}:{proc.monitor_port}", "lmcache_worker_host": HOST,
            "lmcache_worker_ports": 0, "p2p_host": HOST, "p2p_init_ports": 0, "report_interval": 0.001,
        })
        worker = KVWorker(config)
        try:
            assert worker.reporter.synced.wait(10)
            old, new = list(range(16)), list(range(100, 116))
            worker.store(old, synthetic_kv(old, **shape))
            clear = worker.kvstore.clear
            stored_after = []

            def clear_then_store(location=None):
                cleared = clear(location)
                stored_after.append(worker.store(new, synthetic_kv(new, **shape)))
                return cleared

            worker.kvstore.clear = clear_then_store  # the clear command calls the store's clear

            async def main():
                async with HttpClient(HOST, proc.http_port) as http:
                    for _ in range(100):  # the first store's admits are in
                        _, answer = await http.json("POST", "/lookup", {"tokens": old})
                        if answer["layout_info"]:
                            break
                        await asyncio.sleep(0.02)
                    status, _ = await http.json("POST", "/clear", {"instance_id": config.lmcache_instance_id,
                                                                  "location": CPU})
                    _, old_answer = await http.json("POST", "/lookup", {"tokens": old})
                    _, new_answer = await http.json("POST", "/lookup", {"tokens": new})
                return status, old_answer, new_answer

            status, old_answer, new_answer = asyncio.run(main())
        finally:
            worker.close()
        assert stored_after == [16]
        assert status == 200 and old_answer["layout_info"] == {}
        assert new_answer["layout_info"] == {config.lmcache_instance_id: [CPU, 16]}
