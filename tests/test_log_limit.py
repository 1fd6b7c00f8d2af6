"""RateLimitedLog: at most ``burst`` lines per period, the rest counted and reported with the
next line let through; and the controller's refusal logs use it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fake_transport import attach
from lmcache_rs.controller import http as http_module
from lmcache_rs.controller.http import JSON, HttpProtocol, HttpServerState
from lmcache_rs.controller.metrics import Metrics
from lmcache_rs.controller.settings import Settings
from lmcache_rs.log_limit import RateLimitedLog, RepeatLimitedLog

LOGGER = "lmcache_rs.test.log_limit"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_burst_then_suppressed_then_counted_in_the_next_window(caplog):
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger(LOGGER), burst=3, period=1.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for i in range(10):
            limited("refused %d", i)
        assert lines(caplog) == ["refused 0", "refused 1", "refused 2"]
        assert limited.suppressed == 7
        clock.now += 0.999  # same window: still quiet
        limited("refused %d", 10)
        assert len(lines(caplog)) == 3
        clock.now += 0.002
        limited("refused %d", 11)
        assert lines(caplog)[3] == "refused 11 (and 8 similar lines not logged)"
        assert limited.suppressed == 0
        limited("refused %d", 12)
        assert lines(caplog)[4] == "refused 12"


def test_nothing_counted_when_the_level_is_off(caplog):
    limited = RateLimitedLog(logging.getLogger(LOGGER), burst=1, clock=Clock())
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        for _ in range(5):
            limited("x")
    assert limited.suppressed == 0 and lines(caplog) == []


@pytest.mark.parametrize("burst,period", [(0, 1.0), (1, 0.0)])
def test_bad_limits_are_refused(burst, period):
    with pytest.raises(ValueError, match="burst"):
        RateLimitedLog(logging.getLogger(LOGGER), burst=burst, period=period)


def test_a_flood_of_malformed_requests_logs_a_burst_and_counts_all(caplog, monkeypatch):
    limited = RateLimitedLog(logging.getLogger(LOGGER), burst=5, clock=Clock())
    monkeypatch.setattr(http_module, "log_refusal", limited)
    state = HttpServerState(Settings(), Metrics(), lambda req: (200, JSON, b"{}"))

    async def main():
        for _ in range(200):
            proto = HttpProtocol(state)
            t = attach(proto)
            proto.data_received(b"NOT HTTP\r\n\r\n")
            assert t.take().startswith(b"HTTP/1.1 400 ") and t.done
        await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        asyncio.run(main())
    assert len(lines(caplog)) == 5 and all("400 malformed" in m for m in lines(caplog))
    assert limited.suppressed == 195
    assert state.metrics.rejected_requests == {400: 200}


def test_a_repeated_refusal_is_logged_once_a_period_per_key(caplog):

    clock = Clock()
    limited = RepeatLimitedLog(logging.getLogger(LOGGER), period=60.0, max_keys=2, clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(5):  # one worker retrying every second
            limited(("10.0.0.1", "worker_in_use"), "refused %s", "w1")
            clock.now += 1
        limited(("10.0.0.2", "worker_in_use"), "refused %s", "w2")  # another peer: its own line
        assert lines(caplog) == ["refused w1", "refused w2"]
        clock.now += 60
        limited(("10.0.0.1", "worker_in_use"), "refused %s", "w1")
        assert lines(caplog)[-1] == "refused w1 (repeated 4 times in the last 60 s, not logged)"
        for host in ("a", "b", "c"):  # only max_keys remembered: the oldest goes
            limited((host, "x"), "refused %s", host)
        assert len(limited._seen) == 2


def test_a_worker_refused_in_hello_is_logged_once_however_often_it_retries(caplog, monkeypatch):
    from lmcache_rs import Index
    from lmcache_rs.controller import monitor
    from lmcache_rs.controller.monitor import MonitorProtocol, MonitorServerState
    from lmcache_rs.controller.registry import Registry
    from lmcache_rs.wire import encode_frame
    from lmcache_rs.wire.report import PROTOCOL_VERSION

    # a fresh limiter: refusals logged by other tests from the same host must not hide this one
    monkeypatch.setattr(monitor, "log_hello_refusal", RepeatLimitedLog(monitor.log))

    async def main():
        settings = Settings(api_key="right")
        metrics = Metrics()
        state = MonitorServerState(settings, metrics, Registry(Index(256), metrics, 10.0))
        hello = {"t": "hello", "v": PROTOCOL_VERSION, "instance_id": "inst", "worker_id": 0, "world_size": 1,
                 "host": "127.0.0.1", "worker_port": 1, "p2p_host": "127.0.0.1", "p2p_port": 2, "chunk_size": 256,
                 "seed": 0, "api_key": "wrong"}
        for _ in range(5):
            proto = MonitorProtocol(state)
            attach(proto)
            proto.data_received(encode_frame(hello))

    with caplog.at_level(logging.WARNING, logger="lmcache_rs.controller.monitor"):
        asyncio.run(main())
    refusals = [r.getMessage() for r in caplog.records if "refusing frame: unauthorized" in r.getMessage()]
    assert len(refusals) == 1 and "worker inst/0" in refusals[0], refusals
