"""The dashboard page in headless Chromium: it loads, fetches /dashboard.json and shows the workers."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
import zlib

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


SERIES = {  # chart -> its series' colours, as the page draws them
    "lookups": [(0x1F, 0x77, 0xB4)], "latency": [(0x2C, 0xA0, 0x2C), (0xD6, 0x27, 0x28)],
    "hits": [(0x94, 0x67, 0xBD), (0x8C, 0x56, 0x4B)], "ingest": [(0xFF, 0x7F, 0x0E)],
}


def png_rgb(data: bytes) -> tuple[int, int, list[bytearray]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG (Chromium's)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    assert depth == 8 and ctype in (2, 6) and interlace == 0
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride) if kind else ():
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return width, bpp, rows


def ink(shot: bytes, rect: tuple[int, int, int, int], colours) -> int:
    """Pixels inside ``rect`` (left, top, width, height) of the screenshot near one of ``colours``."""
    _, bpp, rows = png_rgb(shot)
    left, top, w, h = rect
    n = 0
    for row in rows[top:top + h]:
        for x in range(left, left + w):
            px = row[x * bpp:x * bpp + 3]
            if any(abs(px[0] - r) + abs(px[1] - g) + abs(px[2] - b) < 60 for r, g, b in colours):
                n += 1
    return n


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
                # lookups in two of the history's seconds, so each chart has a line to draw
                for seconds_with_lookups in (1, 2):
                    for _ in range(3):
                        await http.request("POST", "/lookup", {"tokens": list(range(1000))})
                    deadline = asyncio.get_running_loop().time() + 30
                    while True:
                        _, body = await http.json("GET", "/dashboard.json")
                        ratios = [v for v in body["history"]["hit_ratio"] if v is not None]
                        if len(ratios) >= seconds_with_lookups:
                            break
                        assert asyncio.get_running_loop().time() < deadline, "the history records no lookups"
                        await asyncio.sleep(0.1)
            history = body["history"]
            url = f"http://127.0.0.1:{proc.http_port}/"
            size = "--window-size=1200,1000"  # one layout for both runs: the DOM's rects are the shot's
            dom = (await chromium(size, "--dump-dom", url)).decode()
            shot = tmp_path / "dashboard.png"
            await chromium(f"--screenshot={shot}", size, url)
            for fw in workers:
                await fw.close()
            return dom, shot, history

        dom, shot, history = run_with_workers(main())
        # rendered by the page's script from /dashboard.json, not present in the static HTML
        assert '<h2 class="instance">tp_instance</h2>' in dom
        assert '<h2 class="instance">solo_instance</h2>' in dom
        assert len(re.findall(r'<tr class="worker"><td>\d', dom)) == 3
        assert 'id="n-instances">2<' in dom and 'id="n-workers">3<' in dom
        assert "GPU: 2, LocalCPUBackend: 8" in dom  # chunks per location of solo_instance
        assert 'id="n-lookups">6<' in dom
        assert re.search(r'<div id="status">updated [^<]* chunk size 256</div>', dom)
        assert shot.exists() and shot.stat().st_size > 5000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the history behind the charts: every lookup matched; 768 of its 1000 tokens (3 chunks)
    assert [v for v in history["hit_ratio"] if v is not None] == [1.0, 1.0]
    assert [v for v in history["token_hit_ratio"] if v is not None] == [0.768, 0.768]
    assert sum(v * 0 + 1 for v in history["latency_p99_ms"] if v is not None) == 2
    # each instance's holdings per tier, as bars
    bars = re.findall(r'<div class="bar" data-location="([^"]+)" style="width:(\d+)px', dom)
    assert sorted(bars) == sorted([("LocalCPUBackend", "300"), ("LocalCPUBackend", "300"), ("GPU", "75")])
    # the charts render: drawn in the page (its own pixel count), and visible in the screenshot
    shot_bytes = shot.read_bytes()
    for name, colours in SERIES.items():
        m = re.search(rf'<canvas id="chart-{name}" [^>]*data-points="(\d+)" data-ink="(\d+)" '
                      rf'data-rect="(\d+),(\d+),(\d+),(\d+)"', dom)
        assert m, f"chart {name} was not drawn"
        points, page_ink = int(m.group(1)), int(m.group(2))
        rect = tuple(int(m.group(i)) for i in range(3, 7))
        assert points >= 2 * len(colours) and page_ink > 0, (name, points, page_ink)
        assert ink(shot_bytes, rect, colours) > 0, f"chart {name} is blank in the screenshot"


def test_dashboard_shows_kv_event_publishers_in_headless_chromium(controller):
    """A vLLM-protocol publisher feeding the controller: the page's publishers table shows its
    sequence, batches, events and events/s, and the skipped-reasons line counts a bad payload."""
    import json
    import time
    import urllib.request

    from kv_event_publisher import Publisher, free_port, stored

    endpoint, replay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    ctl = controller("--kv-events", json.dumps({"bind": endpoint, "replay_endpoint": replay}))
    # (what PUB drops before the connection is up comes back by replay: the stream ends up live)
    publisher = Publisher(endpoint, replay)
    base = f"http://127.0.0.1:{ctl.http_port}"

    def dashboard() -> dict:
        with urllib.request.urlopen(base + "/dashboard.json", timeout=10) as r:
            return json.loads(r.read())

    def publishers() -> list:
        return dashboard()["kv_event_publishers"]

    try:
        deadline = time.monotonic() + 30
        while not publishers():  # PUB drops what it sends before the connection is up
            assert time.monotonic() < deadline, "the publisher never connected"
            publisher.publish([])
            time.sleep(0.1)
        publisher.publish([stored(list(range(64)), 16), stored(list(range(100, 132)), 16)])
        publisher.pub.send_multipart([publisher.topic, publisher.seq.to_bytes(8, "big"), b"\xc1garbage"])
        deadline = time.monotonic() + 30
        while ((pub := publishers()[0])["events"] < 2 or pub["blocks"] != 6 or pub["stale"] or pub["replaying"]
               or dashboard()["kv_events_skipped"].get("decode_errors") != 1):
            assert time.monotonic() < deadline, pub
            time.sleep(0.05)
        dom = asyncio.run(chromium("--window-size=1200,1000", "--dump-dom", base + "/")).decode()
    finally:
        publisher.close()
    rows = re.findall(r'<tr class="publisher">(.*?)</tr>', dom)
    assert len(rows) == 1, dom[-3000:]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[0])
    # instance, topic, dp rank, next seq, batches, events, events/s, gaps, replays, restarts, blocks, state
    assert cells[:3] == ["pod-a", "kv@pod-a@tiny", "0"]
    assert int(cells[3]) == publisher.seq  # the garbage payload under that number applied nothing
    assert int(cells[5]) == pub["events"] >= 2 and cells[10] == "6" and cells[11] == "live"
    assert re.fullmatch(r"\d+", cells[6]), cells  # a rate once two refreshes saw the publisher
    assert re.search(r'<p class="skipped">not applied: [^<]*decode_errors 1', dom), dom[-2000:]
