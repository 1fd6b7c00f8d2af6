"""The scheduler's line to the ranks of its own engine.

vLLM runs a connector's scheduler side in the EngineCore process and its worker side in each
rank's worker process (on CPU always another process), and the stores live with the workers.
Each worker side serves a ZMQ ROUTER on an ``ipc://`` path named after the engine; the
scheduler side asks every rank the same question and gets one answer per rank, or None when
a rank does not answer in time (the caller then plans no load: vLLM recomputes).

Messages are msgpack maps; a request carries an ``id`` that its reply repeats, so a late
reply to an abandoned request is recognised and dropped.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
import time
from typing import IO, Any, Callable, Optional

import msgpack
import zmq

from lmcache_rs.log_limit import RateLimitedLog

from .leftovers import hold, remove_unheld

log = logging.getLogger("lmcache_rs.vllm")

# Largest request or reply accepted (a lookup carries a prompt's token ids).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_path(engine_id: str, data_parallel_rank: int, rank: int) -> str:
    """The ipc endpoint of one rank of one engine (unique per user, engine, DP and TP rank)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in engine_id)[:40]
    name = f"lmcache_rs-{os.getuid()}-{safe}-dp{data_parallel_rank}-r{rank}.sock"
    return "ipc://" + os.path.join(tempfile.gettempdir(), name)


class RankServer:
    """Answers the scheduler's requests on a worker: ``handler(request) -> reply`` runs on
    this server's thread, one request at a time; an exception becomes ``{"error": ...}``."""

    def __init__(self, endpoint: str, handler: Callable[[dict], dict]):
        self.endpoint = endpoint
        self._handler = handler
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None
        self._lock: Optional[IO[bytes]] = None
        if path is not None:
            # sockets of engines that died (a killed engine never closes its channels)
            remove_unheld(os.path.join(os.path.dirname(path), f"lmcache_rs-{os.getuid()}-*.sock.lock"),
                          lambda lock_path: [lock_path[:-len(".lock")]])
            self._lock = hold(path + ".lock")
            if os.path.exists(path):
                os.unlink(path)  # left by an engine of the same name that died
        self._socket.bind(endpoint)
        self._stop = threading.Event()
        self._bad = RateLimitedLog(log)
        self._thread = threading.Thread(target=self._serve, name="lmcache-rank-channel", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                continue
            if len(frames) != 2:
                self._bad("rank channel: dropped a message of %d frames", len(frames))
                continue
            try:
                request = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
                if not isinstance(request, dict):
                    raise ValueError("not a map")
            except Exception as exc:
                self._bad("rank channel: dropped an undecodable request (%s)", exc)
                continue
            try:
                reply = self._handler(request)
            except Exception as exc:
                log.exception("rank channel: request %r failed", request.get("op"))
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            reply["id"] = request.get("id")
            try:
                self._socket.send_multipart([frames[0], msgpack.packb(reply)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self._bad("rank channel: reply not sent (%s)", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close(0)
        if self.endpoint.startswith("ipc://"):
            path = self.endpoint[len("ipc://"):]
            for leftover in (path, path + ".lock"):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class RankClient:
    """Asks every rank of the engine (the scheduler side; one caller thread at a time)."""

    def __init__(self, endpoints: list[str], timeout: float = 2.0):
        self.endpoints = endpoints
        self.timeout = timeout
        self._context = zmq.Context.instance()
        self._sockets: list[Optional[zmq.Socket]] = [None] * len(endpoints)
        self._ids = itertools.count(1)
        self._slow = RateLimitedLog(log, burst=3, period=10.0)

    def _socket(self, rank: int) -> zmq.Socket:
        sock = self._sockets[rank]
        if sock is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            sock.connect(self.endpoints[rank])
            self._sockets[rank] = sock
        return sock

    def ask(self, request: dict[str, Any]) -> Optional[list[dict]]:
        """Send ``request`` to every rank; their replies in rank order, or None when one does
        not answer within the timeout or answers with an error."""
        request_id = next(self._ids)
        payload = msgpack.packb({**request, "id": request_id})
        for rank in range(len(self.endpoints)):
            self._socket(rank).send(payload, zmq.NOBLOCK)
        replies: list[Optional[dict]] = [None] * len(self.endpoints)
        deadline = time.monotonic() + self.timeout
        for rank in range(len(self.endpoints)):
            sock = self._socket(rank)
            while replies[rank] is None:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000) + 1):
                    self._slow("rank channel: rank %d did not answer %r within %.1f s; planning no load",
                               rank, request.get("op"), self.timeout)
                    return None
                try:
                    reply = msgpack.unpackb(sock.recv(zmq.NOBLOCK), raw=False, strict_map_key=False)
                except Exception:
                    continue  # a late reply of another request, or garbage: keep waiting
                if isinstance(reply, dict) and reply.get("id") == request_id:
                    if "error" in reply:
                        self._slow("rank channel: rank %d failed %r: %s", rank, request.get("op"), reply["error"])
                        return None
                    replies[rank] = reply
        return [r for r in replies if r is not None]

    def close(self) -> None:
        for sock in self._sockets:
            if sock is not None:
                sock.close(0)
        self._sockets = [None] * len(self.endpoints)
