"""What the connector's scheduler side asks the controller over HTTP: who else holds a prefix
(``/lookup``) and where that instance's ranks serve P2P (``/query_worker_info``).

The scheduler waits on these answers, so every call has a short timeout, and after a failure
the controller is left alone for ``backoff`` seconds (a dead controller costs one timeout per
backoff period, not one per request). Failures return None; the caller then plans no remote
load and vLLM recomputes.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.parse
from typing import Any, Callable, Optional

from lmcache_rs.log_limit import RateLimitedLog

log = logging.getLogger("lmcache_rs.vllm")


def parse_url(url: str) -> tuple[str, int]:
    """(host, port) of ``http://host:port`` or ``host:port``. Raises ValueError."""
    parsed = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if parsed.scheme != "http" or not parsed.hostname or parsed.port is None:
        raise ValueError(f"controller URL must be http://host:port, got {url!r}")
    return parsed.hostname, parsed.port


class ControllerClient:
    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 0.5, backoff: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.host, self.port = parse_url(url)
        self.api_key = api_key
        self.timeout = timeout
        self.backoff = backoff
        self._clock = clock
        self._connection: Optional[http.client.HTTPConnection] = None
        self._quiet_until = float("-inf")
        self._failed = RateLimitedLog(log, burst=1, period=30.0)
        self.failures = 0

    def _post(self, path: str, body: dict[str, Any]) -> Optional[dict]:
        if self._clock() < self._quiet_until:
            return None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        for attempt in (1, 2):  # a kept-alive connection the server closed gets one fresh retry
            try:
                if self._connection is None:
                    self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self._connection.request("POST", path, data, headers)
                response = self._connection.getresponse()
                payload = response.read()
                if response.status != 200:  # the controller is up and said no: no back-off
                    self._failed("controller at %s:%d: POST %s answered %d: %r", self.host, self.port, path,
                                 response.status, payload[:200])
                    return None
                answer = json.loads(payload)
                if not isinstance(answer, dict):
                    raise ValueError("answer is not a JSON object")
                return answer
            except (OSError, ValueError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2 or not isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                        BrokenPipeError)):
                    self.failures += 1
                    self._quiet_until = self._clock() + self.backoff
                    self._failed("controller at %s:%d: POST %s failed (%s); no remote hits for %.0f s",
                                 self.host, self.port, path, exc, self.backoff)
                    return None
        return None

    def lookup(self, tokens: list[int]) -> Optional[dict[str, tuple[str, int]]]:
        """Each instance's (location, matched tokens) for ``tokens``; None on failure."""
        answer = self._post("/lookup", {"tokens": tokens})
        if answer is None:
            return None
        out: dict[str, tuple[str, int]] = {}
        for instance, value in answer.items():
            if instance == "event_id":
                continue
            if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                    and type(value[1]) is int and value[1] >= 0):
                out[instance] = (value[0], value[1])
        return out

    def p2p_addresses(self, instance_id: str) -> Optional[dict[int, tuple[str, int]]]:
        """Each rank's P2P (host, port) of ``instance_id``; None on failure."""
        answer = self._post("/query_worker_info", {"instance_id": instance_id})
        if answer is None:
            return None
        out: dict[int, tuple[str, int]] = {}
        for info in answer.get("worker_infos") or []:
            url = info.get("distributed_url") if isinstance(info, dict) else None
            rank = info.get("worker_id") if isinstance(info, dict) else None
            if not isinstance(url, str) or type(rank) is not int:
                continue
            host, _, port = url.rpartition(":")
            if host and port.isdigit() and int(port) > 0:
                out[rank] = (host, int(port))
        return out

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
