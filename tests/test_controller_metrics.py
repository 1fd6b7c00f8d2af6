"""GET /metrics as Prometheus users expect it: parsed by prometheus_client's own parser, named by
Prometheus' conventions, with the process and build metrics, LMCache's controller names, and
every family documented in docs/controller.md."""

from __future__ import annotations

import json
import re
import socket

from prometheus_client.parser import text_string_to_metric_families

import lmcache_rs
from fake_worker import REPO, ControllerProcess, FakeWorker, HttpClient, run_with_workers

CPU = "LocalCPUBackend"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape() -> tuple[str, dict]:
    """/metrics of a controller with every source on (our workers, LMCache's sockets, KV events),
    after one worker's admits and a few lookups: (text, {sample name{labels}: value})."""
    kv = json.dumps({"bind": f"tcp://127.0.0.1:{free_port()}"})
    with ControllerProcess("--monitor-ports", '{"pull": 0, "reply": 0, "heartbeat": 0}', "--kv-events", kv) as proc:

        async def main():
            fw = FakeWorker("inst", 0, proc.monitor_port)
            await fw.start()
            fw.admit_tokens(CPU, list(range(1024)))
            await fw.barrier()
            async with HttpClient("127.0.0.1", proc.http_port) as http:
                for _ in range(3):
                    await http.request("POST", "/lookup", {"tokens": list(range(600))})
                await http.request("POST", "/lookup", b"nope")
                status, headers, body = await http.request("GET", "/metrics")
            await fw.close()
            assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            return body.decode()

        text = run_with_workers(main())
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return text, samples


def test_metrics_follow_prometheus_conventions_and_are_documented():
    text, samples = scrape()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name, kind in types.items():
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        assert "per_second" not in name and not name.endswith("_rate"), f"a rate exported as {kind}: {name}"

    # /lookup is in the request counter: 3 answered, 1 refused
    assert samples['lmcache_http_requests_total{endpoint="/lookup",status="200"}'] == 3
    assert samples['lmcache_http_requests_total{endpoint="/lookup",status="400"}'] == 1
    assert samples["lmcache_lookups_total"] == 3
    assert samples['lmcache_lookup_latency_seconds_bucket{le="+Inf"}'] == 3

    # the process and the build
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds",
                 "process_open_fds"):
        assert samples[name] > 0, name
    assert any(k.startswith("python_info{") for k in samples)
    (build,) = [k for k in samples if k.startswith("lmcache_build_info{")]
    assert f'version="{lmcache_rs.__version__}"' in build and samples[build] == 1

    # LMCache's controller's names, with its label, carry the same numbers as ours
    aliases = {k.split("{")[0].removeprefix("lmcache:cache_controller_"): v
               for k, v in samples.items() if k.startswith("lmcache:cache_controller_")}
    assert all('{role="controller"}' in k for k in samples if k.startswith("lmcache:"))
    assert aliases["kv_pool_keys_count"] == samples["lmcache_index_holdings"] == 4
    assert aliases["registered_workers_count"] == sum(v for k, v in samples.items() if k.startswith("lmcache_workers{"))
    assert aliases["full_sync_workers_completed"] == samples['lmcache_workers{state="live"}']

    # one table documents every family exported (names as Prometheus shows them)
    doc = (REPO / "docs" / "controller.md").read_text()
    missing = [name for name in types
               if not name.startswith(("process_", "python_")) and not re.search(f"`{re.escape(name)}[`{{]", doc)]
    assert not missing, f"not documented in docs/controller.md: {missing}"
    assert "process_*" in doc and "python_info" in doc
