"""The dashboard page in headless Chromium: it loads, fetches /dashboard.json and shows the workers."""

from __future__ import annotations

import asyncio
import os
import re
import shutil

import pytest

from fake_worker import ControllerProcess, FakeWorker, HttpClient, run_with_workers

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# CI installs Chromium (.ci/run), so there a missing browser is a failure, not a skip
if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI is set but no Chromium is installed: .ci/run should have installed it")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install -y chromium)")


async def chromium(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--virtual-time-budget=4000", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return out


def test_dashboard_in_headless_chromium(tmp_path):
    with ControllerProcess() as proc:

        async def main():
            workers = [FakeWorker("tp_instance", w, proc.monitor_port, world_size=2) for w in (0, 1)]
            workers.append(FakeWorker("solo_instance", 0, proc.monitor_port))
            for fw in workers:
                await fw.start()
                fw.admit_tokens("LocalCPUBackend", list(range(2048)))
                await fw.barrier()
            workers[2].admit_tokens("GPU", list(range(512)))
            await workers[2].barrier()
            async with HttpClient("127.0.0.1", proc.http_port) as http:
                for _ in range(3):
                    await http.request("POST", "/lookup", {"tokens": list(range(1000))})
            url = f"http://127.0.0.1:{proc.http_port}/"
            dom = (await chromium("--dump-dom", url)).decode()
            shot = tmp_path / "dashboard.png"
            await chromium(f"--screenshot={shot}", "--window-size=1200,800", url)
            for fw in workers:
                await fw.close()
            return dom, shot

        dom, shot = run_with_workers(main())
        # rendered by the page's script from /dashboard.json, not present in the static HTML
        assert '<h2 class="instance">tp_instance</h2>' in dom
        assert '<h2 class="instance">solo_instance</h2>' in dom
        assert len(re.findall(r'<tr class="worker"><td>\d', dom)) == 3
        assert 'id="n-instances">2<' in dom and 'id="n-workers">3<' in dom
        assert "GPU: 2, LocalCPUBackend: 8" in dom  # chunks per location of solo_instance
        assert 'id="n-lookups">3<' in dom
        assert re.search(r'<div id="status">updated [^<]* chunk size 256</div>', dom)
        assert shot.exists() and shot.stat().st_size > 5000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
