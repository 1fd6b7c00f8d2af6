"""The controller as a real process on loopback, driven by FakeWorkers and HTTP clients."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import pytest

from fake_worker import ControllerProcess, FakeWorker, HttpClient, build_request, run_with_workers
from lmcache_rs.wire import FrameDecoder, encode_frame
from lmcache_rs.wire.framing import _HEADER
from reference_model import ReferenceIndex, chunk_hashes

CPU, GPU, DISK = "LocalCPUBackend", "GPU", "LocalDiskBackend"
HOST = "127.0.0.1"


def run(coro):
    return run_with_workers(coro)


def layout(answer: dict) -> dict:
    assert isinstance(answer.pop("event_id"), str)
    info = answer.pop("layout_info")
    answer.pop("detail", None)
    assert answer == info  # the spec's flat keys repeat layout_info
    return {k: tuple(v) for k, v in info.items()}


async def lookup(http: HttpClient, tokens: list[int]) -> dict:
    status, body = await http.json("POST", "/lookup", {"tokens": tokens})
    assert status == 200, body
    return layout(body)


async def wait_for(predicate, timeout=5.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


# -- start, stop ------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_logs_where_it_listens_and_stops_gracefully(sig):
    with ControllerProcess() as proc:
        assert f"http=127.0.0.1:{proc.http_port}" in proc.log()

        async def main():
            async with HttpClient(HOST, proc.http_port) as http:
                status, body = await http.json("GET", "/healthz")
                assert status == 200 and body["status"] == "ok"

        run(main())
        assert proc.stop(sig) == 0
        assert "lmcache_controller stopped" in proc.log()
        assert "Traceback" not in proc.log()


def test_bad_flags_and_config_exit_with_a_message(tmp_path):
    import subprocess

    from fake_worker import controller_command

    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1, 2]\n")
    for args, text in [(["--port", "99999"], "port must be"), (["--config", str(bad)], "bad value for chunk_size: [1, 2] (expected an integer)"),
                       (["--config", str(tmp_path / "missing.yaml")], "cannot read config"),
                       (["--max-body-bytes", str(5 << 30)], "max_body_bytes must be at most 4294967295"),
                       (["--port", "20100", "--monitor-port", "20100"], "must differ"),
                       (["--http-threads", "2", "--max-body-bytes", "1000000", "--max-buffered-body-bytes", "1000000"],
                        "must fit in each HTTP loop's share")]:
        r = subprocess.run(controller_command() + args, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr


# -- lookups against the reference model ---------------------------------------------------
def test_random_workload_matches_reference_model():
    chunk = 4
    rng = random.Random(1234)
    with ControllerProcess(config={"chunk_size": chunk, "hash_seed": 7}) as proc:

        async def main():
            layout_ = {"inst_a": 1, "inst_tp": 2, "inst_c": 1}
            workers = {}
            ref = ReferenceIndex(chunk, 7)
            for inst, n in layout_.items():
                for w in range(n):
                    fw = FakeWorker(inst, w, proc.monitor_port, chunk_size=chunk, seed=7, world_size=n)
                    assert (await fw.start())["t"] == "welcome"
                    workers[(inst, w)] = fw
                    ref.register_worker(inst, w)
            # a pool of prompts sharing prefixes
            base = [rng.randrange(50000) for _ in range(40)]
            prompts = [base[: rng.randrange(1, 41)] + [rng.randrange(50000) for _ in range(rng.randrange(0, 9))]
                       for _ in range(30)]
            async with HttpClient(HOST, proc.http_port) as http:
                for step in range(25):
                    for (inst, w), fw in workers.items():
                        ops = []
                        for _ in range(rng.randrange(1, 4)):
                            tokens = rng.choice(prompts)
                            keys = chunk_hashes(tokens, chunk, 7)
                            if rng.random() < 0.3:  # evict a suffix, or a random subset
                                keys = keys[rng.randrange(len(keys)):] if rng.random() < 0.5 else rng.sample(keys, max(1, len(keys) // 2))
                                op = "evict"
                            else:
                                keys = keys[: rng.randrange(1, len(keys) + 1)]
                                op = "admit"
                            loc = rng.choice([CPU, GPU, DISK])
                            ops.append((op, loc, keys))
                            (ref.admit if op == "admit" else ref.evict)(inst, w, loc, keys)
                        fw.send_events(ops)
                    # TP: sometimes both ranks store the same prompt (the common case)
                    tokens = rng.choice(prompts)
                    keys = chunk_hashes(tokens, chunk, 7)
                    for w in (0, 1):
                        workers[("inst_tp", w)].admit(CPU, keys)
                        ref.admit("inst_tp", w, CPU, keys)
                    await asyncio.gather(*(fw.barrier() for fw in workers.values()))
                    for tokens in prompts + [base, base[:3], [1, 2, 3]]:
                        got = await lookup(http, tokens)
                        assert got == ref.lookup(tokens), (step, tokens)
                # detail mode agrees on the best answer
                status, body = await http.json("POST", "/lookup?detail=1", {"tokens": prompts[0]})
                assert status == 200 and set(body["detail"]) >= set(body["layout_info"])
                # a full sync after all this changes nothing
                for fw in workers.values():
                    await fw.full_sync()
                for tokens in prompts:
                    assert await lookup(http, tokens) == ref.lookup(tokens)
            for fw in workers.values():
                await fw.close()

        run(main())


def test_spec_example_through_the_process():
    tokens = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
    with ControllerProcess(config={"chunk_size": 256}) as proc:

        async def main():
            fw = FakeWorker("lmcache_default_instance", 0, proc.monitor_port)
            await fw.start()
            fw.admit_tokens(CPU, tokens)
            await fw.barrier()
            async with HttpClient(HOST, proc.http_port) as http:
                status, body = await http.json("POST", "/lookup", {"tokens": tokens})
                assert status == 200
                assert body["lmcache_default_instance"] == [CPU, 12]
                assert body["layout_info"] == {"lmcache_default_instance": [CPU, 12]}
                assert body["event_id"]
                status, body = await http.json("POST", "/lookup", {"tokens": [1, 2, 3]})
                assert status == 200 and body["layout_info"] == {} and set(body) == {"event_id", "layout_info"}
            await fw.close()

        run(main())


def test_pipelined_lookups_answered_in_order():
    with ControllerProcess() as proc:

        async def main():
            async with HttpClient(HOST, proc.http_port) as http:
                n = 200
                http.raw(b"".join(build_request("POST", "/lookup", json.dumps({"tokens": [i]}).encode()) for i in range(n)))
                ids = []
                for _ in range(n):
                    status, _, body = await http.response()
                    assert status == 200
                    ids.append(int(json.loads(body)["event_id"].rsplit("-", 1)[1]))
                assert ids == sorted(ids) and len(set(ids)) == n

        run(main())


# -- worker liveness -------------------------------------------------------------------------
def test_silent_worker_is_removed_after_heartbeat_timeout():
    with ControllerProcess("--heartbeat-interval", "0.1", "--heartbeat-timeout", "0.6") as proc:

        async def main():
            alive = FakeWorker("alive", 0, proc.monitor_port)
            silent = FakeWorker("silent", 0, proc.monitor_port)
            welcome = await alive.start()
            assert welcome["heartbeat_interval"] == 0.1 and welcome["heartbeat_timeout"] == 0.6
            await silent.start()
            tokens = list(range(300))
            for fw in (alive, silent):
                fw.admit_tokens(CPU, tokens)
                await fw.barrier()
            silent.stop_heartbeats()
            async with HttpClient(HOST, proc.http_port) as http:
                assert set(await lookup(http, tokens)) == {"alive", "silent"}
                t0 = time.monotonic()

                async def gone():
                    return set(await lookup(http, tokens)) == {"alive"}

                await wait_for(gone, timeout=5)
                assert time.monotonic() - t0 >= 0.3
            await alive.close()
            await silent.close(bye=False)

        run(main())
        assert "removed (silent for 0.6 s)" in proc.log()


def test_dropped_worker_matches_nothing_until_it_returns_and_is_removed_if_not():
    with ControllerProcess("--heartbeat-interval", "0.1", "--heartbeat-timeout", "0.8") as proc:

        async def main():
            fw = FakeWorker("inst", 0, proc.monitor_port)
            await fw.start()
            tokens = list(range(600))
            fw.admit_tokens(CPU, tokens)
            await fw.barrier()
            async with HttpClient(HOST, proc.http_port) as http:
                assert await lookup(http, tokens) == {"inst": (CPU, 600)}

                async def gone():
                    return await lookup(http, tokens) == {}

                await fw.drop_connection()
                await wait_for(gone, timeout=5)  # out of reach, it is not live: no match
                await fw.connect()  # returns in time and full-syncs
                await fw.barrier()
                assert await lookup(http, tokens) == {"inst": (CPU, 600)}
                await fw.drop_connection()
                await wait_for(gone, timeout=5)
            await fw.close(bye=False)

        run(main())
        deadline = time.monotonic() + 10
        while "did not reconnect" not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "did not reconnect" in proc.log()


def test_sequence_gap_makes_worker_resync():
    with ControllerProcess() as proc:

        async def main():
            fw = FakeWorker("inst", 0, proc.monitor_port)
            await fw.start()
            a, b = list(range(256)), list(range(1000, 1512))
            fw.admit_tokens(CPU, a)
            # a frame the controller never sees: the worker's state moves on, seq skips
            fw.holdings[CPU].update(chunk_hashes(b))
            fw.seq += 1
            fw.admit(GPU, chunk_hashes(a))
            async with HttpClient(HOST, proc.http_port) as http:

                async def synced():
                    return fw.resyncs and fw.sync_count >= 2 and await lookup(http, b) == {"inst": (CPU, 512)}

                await wait_for(synced)
                assert "events seq 3, expected 2" in fw.resyncs[0]
                assert await lookup(http, a) == {"inst": (GPU, 256)}
                fw.admit(DISK, chunk_hashes(list(range(5000, 5100))))
                await fw.barrier()
                assert await lookup(http, list(range(5000, 5100))) == {"inst": (DISK, 100)}
            await fw.close()

        run(main())


def test_config_mismatch_is_refused():
    with ControllerProcess(config={"chunk_size": 16, "hash_seed": 3}) as proc:

        async def main():
            for kw, text in [({"chunk_size": 256, "seed": 3}, "chunk_size 256 (controller uses 16)"),
                             ({"chunk_size": 16, "seed": 0}, "hash seed 0 (controller uses 3)")]:
                fw = FakeWorker("inst", 0, proc.monitor_port, **kw)
                reply = await fw.start()
                assert reply["t"] == "error" and reply["code"] == "config_mismatch" and text in reply["message"]
                await fw.report.wait_closed()
                await fw.close(bye=False)
            ok = FakeWorker("inst", 0, proc.monitor_port, chunk_size=16, seed=3)
            assert (await ok.start())["t"] == "welcome"
            await ok.close()

        run(main())


def test_controller_restart_workers_reconnect_and_resync():
    proc = ControllerProcess("--heartbeat-interval", "0.2")
    with proc:

        async def main():
            workers = [FakeWorker("tp", w, proc.monitor_port, reconnect=True, world_size=2) for w in (0, 1)]
            tokens = list(range(700))
            for fw in workers:
                await fw.start()
                fw.admit_tokens(CPU, tokens)
                await fw.barrier()
            http_port, monitor_port = proc.http_port, proc.monitor_port
            proc.stop()
            await asyncio.sleep(0.2)
            await asyncio.get_running_loop().run_in_executor(None, proc.start, http_port, monitor_port)
            async with HttpClient(HOST, proc.http_port) as http:

                async def back():
                    return await lookup(http, tokens) == {"tp": (CPU, 700)}

                await wait_for(back, timeout=10)
            for fw in workers:
                await fw.close()

        run(main())


def test_garbage_on_monitor_port_gets_error_frame_and_process_lives():
    with ControllerProcess("--max-frame-bytes", "65536") as proc:

        async def main():
            for data, code in [(b"\x00\x00\x00\x03abc", "bad_msgpack"), (_HEADER.pack(10**9), "frame_too_large"),
                               (encode_frame({"t": "events", "seq": 1, "ops": []}), "hello_required")]:
                reader, writer = await asyncio.open_connection(HOST, proc.monitor_port)
                writer.write(data)
                header = await reader.readexactly(4)
                (err,) = FrameDecoder().feed(header + await reader.readexactly(_HEADER.unpack(header)[0]))
                assert err["t"] == "error" and err["code"] == code
                assert await reader.read() == b""  # closed by the controller
                writer.close()
                await writer.wait_closed()
            async with HttpClient(HOST, proc.http_port) as http:
                status, _, body = await http.request("GET", "/metrics")
                assert status == 200 and b'lmcache_rejected_frames_total{code="frame_too_large"} 1.0\n' in body

        run(main())
        assert proc.alive()


# -- bad HTTP input ---------------------------------------------------------------------------
BAD_BODIES = [
    ("/lookup", b"{not json"),
    ("/lookup", b'{"tokens": "abc"}'),
    ("/lookup", b'{"tokens": [1, "x"]}'),
    ("/lookup", b'{"tokens": [-1]}'),
    ("/lookup", b'{"tokens": [4294967296]}'),
    ("/lookup", b'{"tokns": [1]}'),
    ("/lookup", b"[1, 2]"),
    ("/lookup", b""),
    ("/clear", b'{"location": "GPU"}'),
    ("/clear", b'{"instance_id": 5}'),
    ("/pin", b'{"instance_id": "x", "tokens": [true]}'),
    ("/move", b'{"old_position": ["a"], "new_position": ["b", "GPU"]}'),
    ("/move", b'{"old_position": ["a", "GPU"], "new_position": ["b", "GPU"], "copy": "yes"}'),
    ("/compress", b'{"instance_id": "x", "location": "GPU"}'),
    ("/health", b"{}"),
    ("/check_finish", b'{"event_id": 3}'),
    ("/query_worker_info", b'{"instance_id": "x", "worker_ids": ["0"]}'),
    ("/query_instance", b'{"ipp": "1.2.3.4"}'),
    ("/clear", b"[" * 100000),
    ("/lookup", b"[" * 100000),
    ("/lookup", b'{"tokens": ' + b"[" * 100000),
    ("/health", b'{"instance_id": "\xff\xfe"}'),
]


def test_bad_input_is_answered_never_raised():
    with ControllerProcess("--max-body-bytes", "400000", "--max-header-bytes", "2048") as proc:

        async def main():
            async with HttpClient(HOST, proc.http_port) as http:
                for path, body in BAD_BODIES:
                    status, headers, data = await http.request("POST", path, body)
                    assert status == 400, (path, body, data)
                    assert headers["content-type"] == "application/json"
                    error = json.loads(data)["error"]
                    assert error and "Traceback" not in error
                status, body = await http.json("POST", "/nowhere", {})
                assert status == 404 and "error" in body
                status, headers, _ = await http.request("GET", "/lookup")
                assert status == 405 and headers["allow"] == "POST"
                status, _, _ = await http.request("DELETE", "/metrics")
                assert status == 405
                status, body = await http.json("POST", "/health", {"instance_id": "ghost"})
                assert status == 404 and "unknown instance" in body["error"]
                status, body = await http.json("POST", "/check_finish", {"event_id": "nope"})
                assert status == 200 and body == {"status": "not_found"}
                # the connection survived all of that
                status, _, _ = await http.request("GET", "/healthz")
                assert status == 200
                # HEAD of a GET page: its head, no body, and the connection stays in step
                http.raw(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await asyncio.wait_for(http.reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 0" not in head
                status, _, data = await http.response()
                assert status == 200 and json.loads(data)["status"] == "ok"
            # 413 before the body is read: send only the headers
            async with HttpClient(HOST, proc.http_port) as http:
                http.raw(b"POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 400001\r\n\r\n")
                status, headers, body = await http.response()
                assert status == 413 and headers["connection"] == "close"
                assert await http.reader.read() == b""
            async with HttpClient(HOST, proc.http_port) as http:
                status, _, _ = await http.request("GET", "/healthz", headers={"X-Big": "a" * 4000})
                assert status == 431
            async with HttpClient(HOST, proc.http_port) as http:
                http.raw(b"BREW /pot HTCPCP/1.0\r\n\r\n")
                status, _, _ = await http.response()
                assert status == 400

        run(main())
        assert proc.alive()
        assert "Traceback" not in proc.log()


def test_timeouts_and_connection_limit():
    with ControllerProcess("--keepalive-timeout", "0.3", "--request-timeout", "0.4", "--max-connections", "3") as proc:

        async def main():
            # an idle keep-alive connection is closed
            async with HttpClient(HOST, proc.http_port) as http:
                assert (await http.request("GET", "/healthz"))[0] == 200
                t0 = time.monotonic()
                assert await asyncio.wait_for(http.reader.read(), 5) == b""
                assert time.monotonic() - t0 < 3
            # a slow client gets 408
            async with HttpClient(HOST, proc.http_port) as http:
                http.raw(b"POST /lookup HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"tok")
                status, _, body = await asyncio.wait_for(http.response(), 5)
                assert status == 408
            # the connection limit
            clients = [HttpClient(HOST, proc.http_port) for _ in range(4)]
            for c in clients[:3]:
                await c.__aenter__()
                assert (await c.request("GET", "/healthz"))[0] == 200
            await clients[3].__aenter__()
            status, _, _ = await clients[3].response()
            assert status == 503
            for c in clients:
                await c.close()
            await asyncio.sleep(0.1)
            async with HttpClient(HOST, proc.http_port) as http:
                assert (await http.request("GET", "/healthz"))[0] == 200

        run(main())
        assert proc.alive()


# -- management endpoints end to end -------------------------------------------------------
def test_management_endpoints_against_workers():
    chunk = 16
    with ControllerProcess(config={"chunk_size": chunk}) as proc:

        async def main():
            src = [FakeWorker("src", w, proc.monitor_port, chunk_size=chunk, world_size=2) for w in (0, 1)]
            dst = [FakeWorker("dst", w, proc.monitor_port, chunk_size=chunk, world_size=2) for w in (0, 1)]
            tokens = list(range(100))
            for fw in src + dst:
                await fw.start()
            for fw in src:
                fw.admit_tokens(CPU, tokens)
                await fw.barrier()
            async with HttpClient(HOST, proc.http_port) as http:
                assert await lookup(http, tokens) == {"src": (CPU, 100)}
                status, body = await http.json("POST", "/health", {"instance_id": "src"})
                assert status == 200 and body["error_codes"] == {"0": 0, "1": 0} and body["event_id"]

                status, body = await http.json("POST", "/query_worker_info", {"instance_id": "src", "worker_ids": [1]})
                assert status == 200
                (info,) = body["worker_infos"]
                assert info["worker_id"] == 1 and info["port"] == src[1].worker_port
                assert info["distributed_url"] == f"127.0.0.1:{src[1].p2p_port}"
                assert info["locations"][CPU]["chunks"] == 7
                # "all": every worker of every instance
                status, body = await http.json("POST", "/query_worker_info", {"instance_id": "all"})
                assert status == 200
                assert sorted((i["instance_id"], i["worker_id"], i["port"]) for i in body["worker_infos"]) == sorted(
                    (fw.instance_id, fw.worker_id, fw.worker_port) for fw in src + dst)

                status, body = await http.json("POST", "/query_instance", {"ip": "127.0.0.1"})
                assert status == 200 and body["res"] in ("src", "dst")
                status, body = await http.json("POST", "/query_instance", {"ip": "10.9.9.9"})
                assert status == 404

                status, body = await http.json("POST", "/pin", {"instance_id": "src", "location": CPU, "tokens": tokens})
                assert status == 200 and body["num_tokens"] == 100
                assert all(len(fw.pinned) == 7 for fw in src)

                req = {"instance_id": "src", "method": "cachegen", "location": CPU, "tokens": tokens[:48]}
                status, body = await http.json("POST", "/compress", req)
                assert status == 200 and body["num_tokens"] == 48
                assert all(len(fw.compressed) == 3 for fw in src)
                assert all(a["method"] == "cachegen" and a["location"] == CPU for fw in src
                           for op, a in fw.commands if op == "compress")
                status, body = await http.json("POST", "/decompress", req)
                assert status == 200 and body["num_tokens"] == 48
                assert all(not fw.compressed for fw in src)
                status, body = await http.json("POST", "/check_finish", {"event_id": body["event_id"]})
                assert body == {"status": "completed"}

                # move src -> dst (not a copy): dst ranks fetch from the matching src ranks, then src evicts
                status, body = await http.json("POST", "/move", {"old_position": ["src", CPU], "new_position": ["dst", GPU],
                                                                 "tokens": tokens, "copy": False})
                assert status == 200 and body["num_tokens"] == 100
                event_id = body["event_id"]

                async def finished():
                    status, body = await http.json("POST", "/check_finish", {"event_id": event_id})
                    return body["status"] if body["status"] != "running" else None

                assert await wait_for(finished) == "completed"
                for s, d in zip(src, dst):
                    fetch = [a for op, a in d.commands if op == "fetch"]
                    assert fetch and fetch[0]["source"] == ["127.0.0.1", s.p2p_port] and fetch[0]["location"] == GPU
                    assert any(op == "evict" for op, _ in s.commands)
                for fw in src + dst:
                    await fw.barrier()
                assert await lookup(http, tokens) == {"dst": (GPU, 100)}

                # a copy back leaves both
                status, body = await http.json("POST", "/move", {"old_position": ["dst", GPU], "new_position": ["src", DISK],
                                                                 "tokens": tokens, "copy": True})
                event_id = body["event_id"]
                assert await wait_for(finished) == "completed"
                for fw in src + dst:
                    await fw.barrier()
                assert await lookup(http, tokens) == {"dst": (GPU, 100), "src": (DISK, 100)}

                status, body = await http.json("POST", "/clear", {"instance_id": "dst", "location": GPU})
                assert status == 200 and body["num_tokens"] == 7 * chunk and body["event_id"]
                assert (await http.json("POST", "/check_finish", {"event_id": body["event_id"]}))[1] == {"status": "completed"}
                assert await lookup(http, tokens) == {"src": (DISK, 100)}
                assert all(not fw.holdings.get(GPU) for fw in dst)

                # a worker that cannot be reached makes the operation fail with 502, not hang or crash
                await dst[1].close(bye=False)
                status, body = await http.json("POST", "/pin", {"instance_id": "dst", "tokens": tokens})
                assert status == 502 and "pin failed on dst/1" in body["error"], body
            for fw in src + dst[:1]:
                await fw.close()

        run(main())
        assert "Traceback" not in proc.log()



def test_worker_info_of_an_odd_shape_is_an_error_entry_not_a_500():
    class OddInfoWorker(FakeWorker):
        def _info(self, args):
            out = super()._info(args)
            out["locations"] = {CPU: {"chunks": 1, "bytes": b"\x01\x02"}}  # msgpack bin: not JSON
            return out

    with ControllerProcess() as proc:

        async def main():
            odd = OddInfoWorker("inst", 0, proc.monitor_port, world_size=2)
            good = FakeWorker("inst", 1, proc.monitor_port, world_size=2)
            for fw in (odd, good):
                await fw.start()
            async with HttpClient(HOST, proc.http_port) as http:
                status, body = await http.json("POST", "/query_worker_info", {"instance_id": "inst"})
            for fw in (odd, good):
                await fw.close()
            return status, body

        status, body = run_with_workers(main())
        assert status == 200
        infos = {i["worker_id"]: i for i in body["worker_infos"]}
        assert "malformed info reply" in infos[0]["error"] and "locations" not in infos[0]
        assert infos[1]["locations"] == {} and "error" not in infos[1]
        assert "Traceback" not in proc.log()

def test_metrics_and_dashboard_json():
    with ControllerProcess() as proc:

        async def main():
            fw = FakeWorker("inst", 0, proc.monitor_port)
            await fw.start()
            fw.admit_tokens(CPU, list(range(1000)))
            await fw.barrier()
            async with HttpClient(HOST, proc.http_port) as http:
                for _ in range(5):
                    await lookup(http, list(range(600)))
                await http.request("POST", "/lookup", b"nope")
                status, headers, body = await http.request("GET", "/metrics")
                text = body.decode()
                assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
                for line in ["lmcache_lookups_total 5.0", "lmcache_lookup_errors_total 1.0",
                             'lmcache_lookup_latency_seconds_bucket{le="+Inf"} 5.0', "lmcache_index_chunks 4.0",
                             'lmcache_workers{state="live"} 1.0', 'lmcache_ingest_keys_total{op="admit"} 4.0',
                             'lmcache_rejected_requests_total{status="400"} 1.0',
                             'lmcache_http_requests_total{endpoint="/lookup",status="200"} 5.0',
                             'lmcache_http_requests_total{endpoint="/lookup",status="400"} 1.0',
                             'lmcache_holder_chunks{instance="inst",location="LocalCPUBackend",worker="0"} 4.0']:
                    assert line in text, line
                status, body = await http.json("GET", "/dashboard.json")
                assert status == 200 and body["chunks"] == 4 and body["lookups"] == 5
                (inst,) = body["instances"]
                assert inst["instance_id"] == "inst" and inst["locations"] == {CPU: 4}
                assert inst["workers"][0]["state"] == "live"
                status, headers, page = await http.request("GET", "/")
                assert status == 200 and headers["content-type"].startswith("text/html") and b"/dashboard.json" in page
            await fw.close()

        run(main())


# -- snapshots ------------------------------------------------------------------------------
def test_snapshot_restart_answers_at_once_and_absent_workers_expire(tmp_path):
    snap = tmp_path / "index.snap"
    tokens = list(range(1000))
    args = ("--snapshot", str(snap), "--snapshot-interval", "0.2", "--heartbeat-timeout", "1.0",
            "--heartbeat-interval", "0.2")
    proc = ControllerProcess(*args)
    with proc:

        async def populate():
            fw = FakeWorker("inst", 0, proc.monitor_port)
            await fw.start()
            fw.admit_tokens(GPU, tokens)
            await fw.barrier()
            await asyncio.sleep(0.5)  # a periodic snapshot
            await fw.drop_connection()
            await fw.close(bye=False)

        run(populate())
        assert snap.exists()
        assert proc.stop(signal.SIGKILL) != 0  # no shutdown snapshot: the periodic one must do
        proc.start()

        async def after_restart():
            async with HttpClient(HOST, proc.http_port) as http:
                assert await lookup(http, tokens) == {"inst": (GPU, 1000)}
                status, body = await http.json("POST", "/health", {"instance_id": "inst"})
                assert status == 200 and body["error_codes"] == {"0": -1}  # restored, not reconnected

                async def gone():
                    return await lookup(http, tokens) == {}

                await wait_for(gone, timeout=5)

        run(after_restart())
        assert "snapshot" in proc.log() and "did not reconnect" in proc.log()
        assert proc.stop() == 0  # writes the shutdown snapshot


def test_corrupt_snapshot_starts_empty(tmp_path):
    snap = tmp_path / "index.snap"
    snap.write_bytes(b"not a snapshot at all")
    with ControllerProcess("--snapshot", str(snap)) as proc:

        async def main():
            async with HttpClient(HOST, proc.http_port) as http:
                assert await lookup(http, [1, 2, 3]) == {}

        run(main())
        assert "not loaded" in proc.log()
        assert proc.stop() == 0
    assert snap.read_bytes() != b"not a snapshot at all"  # replaced by the shutdown snapshot


def test_shared_keys_from_lmcache_environment_variables_as_the_workers_read_them(tmp_path):
    # the same file and variables for both sides: the controller must end up with what a worker does
    config = tmp_path / "c.yaml"
    config.write_text("chunk_size: 64\nmax_frame_bytes: 8192\n")
    env = {"LMCACHE_CONFIG_FILE": str(config), "LMCACHE_CHUNK_SIZE": "128", "LMCACHE_HASH_SEED": "7"}
    with ControllerProcess(env=env) as proc:

        async def main():
            wrong = FakeWorker("inst", 0, proc.monitor_port, chunk_size=64, seed=7)
            assert (await wrong.start())["code"] == "config_mismatch"
            await wrong.close(bye=False)
            right = FakeWorker("inst", 0, proc.monitor_port, chunk_size=128, seed=7)
            assert (await right.start())["t"] == "welcome"
            right.report.send({"t": "sync_chunk", "location": CPU, "hashes": b"\0" * 9000})  # > 8192
            await asyncio.sleep(0.3)
            await right.close(bye=False)

        run_with_workers(main())
        assert "chunk_size=128 hash_seed=7" in proc.log()
        assert "frame_too_large" in proc.log()
    import subprocess

    from fake_worker import controller_command

    r = subprocess.run(controller_command(), capture_output=True, text=True, timeout=30,
                       env={**os.environ, "LMCACHE_CHUNK_SIZE": "many"})
    assert r.returncode == 2 and "chunk_size" in r.stderr and "many" in r.stderr and "Traceback" not in r.stderr

def test_api_key_from_flag_or_environment():
    for args, env in [(("--api-key", "k1"), None), ((), {"LMCACHE_API_KEY": "k1"}),
                      ((), {"LMCACHE_CONTROLLER_API_KEY": "k1", "LMCACHE_API_KEY": "other"}),
                      (("--api-key", "k1"), {"LMCACHE_CONTROLLER_API_KEY": "other"})]:
        with ControllerProcess(*args, env=env) as proc:

            async def main():
                bad = FakeWorker("inst", 0, proc.monitor_port)
                assert (await bad.start())["code"] == "unauthorized"
                await bad.close(bye=False)
                good = FakeWorker("inst", 0, proc.monitor_port, api_key="k1")
                assert (await good.start())["t"] == "welcome"
                await good.close()

            run(main())
            assert "k1" not in proc.log()


# -- several HTTP loops ---------------------------------------------------------------------
def test_several_http_loops_share_the_port():
    with ControllerProcess("--http-threads", "3") as proc:

        async def main():
            fw = FakeWorker("inst", 0, proc.monitor_port)
            await fw.start()
            tokens = list(range(777))
            fw.admit_tokens(CPU, tokens)
            await fw.barrier()
            clients = [HttpClient(HOST, proc.http_port) for _ in range(16)]
            loops = set()
            for c in clients:
                await c.__aenter__()
            for _ in range(3):
                for c in clients:
                    status, body = await c.json("POST", "/lookup", {"tokens": tokens})
                    assert status == 200 and body["inst"] == [CPU, 777]
                    loops.add(body["event_id"].rsplit("-", 1)[0])
                    # everything else is forwarded to the main loop, whichever loop accepted
                    status, body = await c.json("POST", "/health", {"instance_id": "inst"})
                    assert status == 200 and body["error_codes"] == {"0": 0}
            assert len(loops) >= 2, loops  # connections were spread over the loops
            status, _, text = await clients[0].request("GET", "/metrics")
            assert b"lmcache_lookups_total 48.0\n" in text
            assert b"lmcache_http_connections 16.0\n" in text  # on every loop, not just the main one
            status, body = await clients[1].json("GET", "/dashboard.json")
            assert body["lookups"] == 48
            for c in clients:
                await c.close()
            await fw.close()

        run(main())
        # a second controller on the same port is refused, not silently sharing it
        import subprocess

        from fake_worker import controller_command

        r = subprocess.run(controller_command() + ["--host", HOST, "--port", str(proc.http_port), "--monitor-port", "0",
                                                   "--http-threads", "2"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "address already in use" in r.stderr.lower()
        assert proc.stop() == 0
        assert "Traceback" not in proc.log()


def test_wrong_protocol_on_each_port_is_told_the_right_port():
    """curl at the monitor port gets an HTTP answer naming the HTTP port (logged once); a worker
    frame decoder fed an HTTP answer says the peer speaks HTTP, not 'frame of 1213486160 bytes'."""
    import socket

    from lmcache_rs.wire import FrameDecoder, FrameError

    with ControllerProcess() as proc:
        for _ in range(3):
            with socket.create_connection((HOST, proc.monitor_port), timeout=10) as s:
                s.sendall(b"POST /lookup HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 400 "), reply
            assert f"served on port {proc.http_port}".encode() in reply, reply
        log = proc.log()
    assert log.count("an HTTP client connected to --monitor-port") == 1, log
    with pytest.raises(FrameError) as err:
        FrameDecoder(1 << 20).feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert err.value.code == "http_peer" and "controller_pull_url" in str(err.value)
