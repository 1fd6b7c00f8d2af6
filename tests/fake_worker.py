"""Test peers that really speak docs/protocol.md, and a controller subprocess to point them at.

``FakeWorker`` holds chunk keys (no tensors) per location and does what a worker does on
the wire: hello + full sync on the report connection, heartbeats, numbered ``events``,
a full sync again on ``resync``, a command server answering the controller's commands,
and a P2P server/client for ``fetch``. It is a peer of the controller, not a mock of it.

``ControllerProcess`` starts ``lmcache_controller`` on free loopback ports and stops it.
``HttpClient`` is a small keep-alive HTTP/1.1 client on asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import xxhash

from lmcache_rs.wire import (
    FrameDecoder,
    Session,
    connect,
    encode_frame,
    pack_u64s,
    serve,
    unpack_u32s,
    unpack_u64s,
)
from lmcache_rs.wire.framing import _HEADER
from reference_model import chunk_hashes

from lmcache_rs.wire.report import PROTOCOL_VERSION  # noqa: E402
REPO = Path(__file__).resolve().parent.parent
_LIVE: set["FakeWorker"] = set()


def run_with_workers(coro):
    """Run ``coro`` on uvloop; close every FakeWorker it left open, even when it fails."""
    import uvloop

    async def main():
        try:
            return await coro
        finally:
            for worker in list(_LIVE):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(worker.close(bye=False), 5)

    return uvloop.run(main())


def payload(key: int) -> bytes:
    return key.to_bytes(8, "little") * 4


class FakeWorker:
    def __init__(self, instance_id: str, worker_id: int, monitor_port: int, *, monitor_host: str = "127.0.0.1",
                 chunk_size: int = 256, seed: int = 0, version: int = PROTOCOL_VERSION,
                 heartbeat: bool = True, reconnect: bool = False, api_key: str | None = None, world_size: int = 1):
        self.instance_id = instance_id
        self.worker_id = worker_id
        self.world_size = world_size
        self.monitor = (monitor_host, monitor_port)
        self.chunk_size = chunk_size
        self.seed = seed
        self.version = version
        self.heartbeat_enabled = heartbeat
        self.reconnect = reconnect
        self.api_key = api_key
        self.holdings: dict[str, set[int]] = {}
        self.pinned: set[int] = set()
        self.compressed: set[int] = set()
        self.clear_reports_seq = True  # False: answer clear as a worker that names no report frame
        self.seq = 0
        self.report: Session | None = None
        self.welcome: dict | None = None
        self.errors: list[dict] = []
        self.resyncs: list[str] = []
        self.commands: list[tuple[str, dict]] = []
        self._pongs: dict[int, asyncio.Future] = {}
        self._ping_ids = 0
        self._welcomed: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.command_server: asyncio.AbstractServer | None = None
        self.p2p_server: asyncio.AbstractServer | None = None
        self.worker_port = 0
        self.p2p_port = 0
        self.sync_count = 0
        self._command_sessions: list[Session] = []
        self._p2p_writers: set[asyncio.StreamWriter] = set()
        _LIVE.add(self)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, sync: bool = True) -> dict:
        """Open the command and P2P servers, register, and (by default) full-sync. Returns welcome or error."""
        handlers = {
            "health": self._health, "clear": self._clear, "pin": self._pin, "unpin": self._unpin,
            "lookup": self._lookup, "fetch": self._fetch, "evict": self._evict,
            "compress": self._compress, "decompress": self._decompress, "info": self._info,
        }
        self.command_server = await serve("127.0.0.1", 0, handlers, on_open=self._command_sessions.append)
        self.worker_port = self.command_server.sockets[0].getsockname()[1]
        self.p2p_server = await asyncio.start_server(self._serve_p2p, "127.0.0.1", 0)
        self.p2p_port = self.p2p_server.sockets[0].getsockname()[1]
        return await self.connect(sync=sync)

    async def connect(self, sync: bool = True) -> dict:
        loop = asyncio.get_running_loop()
        self._welcomed = loop.create_future()
        self.report = await connect(*self.monitor, on_message=self._on_message, on_close=self._on_close)
        self.report.send(self.hello())
        reply = await asyncio.wait_for(self._welcomed, 5)
        if reply["t"] == "welcome":
            if self.heartbeat_enabled:
                self._spawn(self._heartbeats(reply["heartbeat_interval"]))
            if sync:
                await self.full_sync()
        return reply

    def hello(self) -> dict:
        extra = {} if self.api_key is None else {"api_key": self.api_key}
        return {**extra,
            "t": "hello", "v": self.version, "instance_id": self.instance_id, "worker_id": self.worker_id,
            "world_size": self.world_size,
            "host": "127.0.0.1", "worker_port": self.worker_port, "p2p_host": "127.0.0.1",
            "p2p_port": self.p2p_port, "chunk_size": self.chunk_size, "seed": self.seed,
        }

    async def close(self, bye: bool = True) -> None:
        _LIVE.discard(self)
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.report is not None and not self.report.closed:
            if bye:
                self.report.send({"t": "bye"})
            self.report.close()
            await self.report.wait_closed()
        for server in (self.command_server, self.p2p_server):
            if server is not None:
                server.close()
        for session in self._command_sessions:
            session.close()
            await session.wait_closed()
        for writer in list(self._p2p_writers):
            writer.close()
        for server in (self.command_server, self.p2p_server):
            if server is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 2)
        self.command_server = self.p2p_server = None

    async def drop_connection(self) -> None:
        """Lose the report connection without a bye (as a crash would)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.report is not None:
            self.report.abort()
            await self.report.wait_closed()

    def stop_heartbeats(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.report is not None and not self.report.closed:
                self.report.send({"t": "heartbeat", "seq": self.seq})

    def _on_message(self, m: dict) -> None:
        kind = m["t"]
        if kind in ("welcome", "error"):
            if kind == "error":
                self.errors.append(m)
            if self._welcomed is not None and not self._welcomed.done():
                self._welcomed.set_result(m)
        elif kind == "resync":
            self.resyncs.append(m["reason"])
            self._spawn(self.full_sync())
        elif kind == "pong":
            future = self._pongs.pop(m["id"], None)
            if future is not None and not future.done():
                future.set_result(None)

    def _on_close(self, session, exc) -> None:
        for future in self._pongs.values():
            if not future.done():
                future.set_exception(ConnectionError("report connection closed"))
        self._pongs.clear()
        if self.reconnect and not self._closing:
            self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._closing:
            await asyncio.sleep(delay)
            try:
                await self.connect(sync=True)
                return
            except (OSError, asyncio.TimeoutError):
                delay = min(delay * 2, 0.5)

    # -- reporting -------------------------------------------------------------------------
    async def full_sync(self, chunk_keys: int = 1000) -> None:
        assert self.report is not None
        self.sync_count += 1
        self.report.send({"t": "sync_start", "seq": self.seq})
        count = 0
        for location, keys in self.holdings.items():
            keys = sorted(keys)
            for i in range(0, len(keys), chunk_keys):
                part = keys[i:i + chunk_keys]
                self.report.send({"t": "sync_chunk", "location": location, "hashes": pack_u64s(part)})
                count += len(part)
        self.report.send({"t": "sync_end", "count": count})
        await self.barrier()

    def send_events(self, ops: list[tuple[str, str, list[int]]]) -> None:
        for op, location, keys in ops:
            held = self.holdings.setdefault(location, set())
            if op == "admit":
                held.update(keys)
            else:
                held.difference_update(keys)
        self.seq += 1
        assert self.report is not None
        self.report.send({"t": "events", "seq": self.seq,
                          "ops": [[op, loc, pack_u64s(keys)] for op, loc, keys in ops]})

    def admit(self, location: str, keys: list[int]) -> None:
        self.send_events([("admit", location, keys)])

    def evict(self, location: str, keys: list[int]) -> None:
        self.send_events([("evict", location, keys)])

    def admit_tokens(self, location: str, tokens: list[int]) -> list[int]:
        keys = chunk_hashes(tokens, self.chunk_size, self.seed)
        self.admit(location, keys)
        return keys

    async def barrier(self, timeout: float = 10.0) -> None:
        """Wait until the controller has applied everything sent so far (ping/pong)."""
        assert self.report is not None
        self._ping_ids += 1
        future = asyncio.get_running_loop().create_future()
        self._pongs[self._ping_ids] = future
        self.report.send({"t": "ping", "id": self._ping_ids})
        await asyncio.wait_for(future, timeout)

    # -- commands --------------------------------------------------------------------------
    def _keys(self, args: dict) -> list[int]:
        return chunk_hashes(list(unpack_u32s(args["tokens"])), self.chunk_size, self.seed)

    def _health(self, args):
        self.commands.append(("health", args))
        return {"ok": True, "chunks": sum(len(v) for v in self.holdings.values()),
                "locations": {k: len(v) for k, v in self.holdings.items()}}

    def _clear(self, args):
        self.commands.append(("clear", args))
        location = args.get("location")
        ops = [("evict", loc, sorted(keys)) for loc, keys in self.holdings.items()
               if (location is None or loc == location) and keys]
        cleared = sum(len(k) for _, _, k in ops)
        if ops:
            self.send_events(ops)
        if self.clear_reports_seq:
            return {"cleared": cleared, "seq": self.seq}
        return {"cleared": cleared}

    def _held_prefix(self, keys: list[int], location: str | None = None) -> list[int]:
        out = []
        for key in keys:
            if any(key in held for loc, held in self.holdings.items() if location is None or loc == location):
                out.append(key)
            else:
                break
        return out

    def _pin(self, args):
        self.commands.append(("pin", args))
        keys = self._held_prefix(self._keys(args))
        self.pinned.update(keys)
        return {"chunks": len(keys)}

    def _unpin(self, args):
        self.commands.append(("unpin", args))
        keys = [k for k in self._keys(args) if k in self.pinned]
        self.pinned.difference_update(keys)
        return {"chunks": len(keys)}

    def _lookup(self, args):
        keys = self._keys(args)
        n = len(self._held_prefix(keys))
        return {"matched": min(n * self.chunk_size, len(args["tokens"]) // 4)}

    def _evict(self, args):
        self.commands.append(("evict", args))
        location = args.get("location")
        keys = set(self._keys(args))
        ops = [("evict", loc, sorted(keys & held)) for loc, held in self.holdings.items()
               if (location is None or loc == location) and keys & held]
        if ops:
            self.send_events(ops)
        return {"chunks": sum(len(k) for _, _, k in ops)}

    def _compress(self, args):
        self.commands.append(("compress", args))
        keys = self._held_prefix(self._keys(args), args.get("location"))
        self.compressed.update(keys)
        return {"chunks": len(keys), "bytes_before": 32 * len(keys), "bytes_after": 16 * len(keys)}

    def _decompress(self, args):
        self.commands.append(("decompress", args))
        keys = [k for k in self._keys(args) if k in self.compressed]
        self.compressed.difference_update(keys)
        return {"chunks": len(keys), "bytes_before": 16 * len(keys), "bytes_after": 32 * len(keys)}

    def _info(self, args):
        return {"instance_id": self.instance_id, "worker_id": self.worker_id, "host": "127.0.0.1",
                "worker_port": self.worker_port, "p2p_host": "127.0.0.1", "p2p_port": self.p2p_port,
                "locations": {loc: {"chunks": len(k), "bytes": 32 * len(k), "capacity": 1 << 30}
                              for loc, k in self.holdings.items()}}

    async def _fetch(self, args):
        self.commands.append(("fetch", args))
        keys = self._keys(args)
        host, port = args["source"]
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(encode_frame({"t": "get", "id": 1, "keys": pack_u64s(keys)}))
            got = []
            decoder = FrameDecoder()
            while True:
                header = await reader.readexactly(4)
                body = await reader.readexactly(_HEADER.unpack(header)[0])
                (m,) = decoder.feed(header + body)
                if m["t"] == "end":
                    break
                raw = await reader.readexactly(m["nbytes"])
                if xxhash.xxh3_64_intdigest(raw) != m["checksum"]:
                    raise ValueError("checksum mismatch")
                got.append(m["key"])
        finally:
            writer.close()
            await writer.wait_closed()
        if got:
            self.admit(args["location"], got)
        return {"chunks": len(got), "tokens": min(len(got) * self.chunk_size, len(args["tokens"]) // 4)}

    async def _serve_p2p(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._p2p_writers.add(writer)
        try:
            decoder = FrameDecoder()
            while True:
                header = await reader.readexactly(4)
                body = await reader.readexactly(_HEADER.unpack(header)[0])
                (m,) = decoder.feed(header + body)
                held = set().union(*self.holdings.values()) if self.holdings else set()
                missing = []
                for key in unpack_u64s(m["keys"]):
                    if key in held:
                        raw = payload(key)
                        writer.write(encode_frame({"t": "chunk", "id": m["id"], "key": key, "dtype": "uint8",
                                                   "shape": [len(raw)], "nbytes": len(raw),
                                                   "checksum": xxhash.xxh3_64_intdigest(raw)}) + raw)
                    else:
                        missing.append(key)
                writer.write(encode_frame({"t": "end", "id": m["id"], "missing": pack_u64s(missing)}))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._p2p_writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# -- HTTP -----------------------------------------------------------------------------------
class HttpClient:
    """Keep-alive HTTP/1.1 over one asyncio stream connection."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self.writer = None

    def raw(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def request(self, method: str, path: str, body: bytes | dict | list | None = None,
                      headers: dict | None = None) -> tuple[int, dict, bytes]:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.raw(build_request(method, path, body, headers))
        return await self.response()

    async def response(self) -> tuple[int, dict, bytes]:
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if status == 100:
            return await self.response()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def json(self, method: str, path: str, body=None) -> tuple[int, dict]:
        status, _, data = await self.request(method, path, body)
        return status, json.loads(data)


def build_request(method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


# -- the controller as a subprocess ---------------------------------------------------------
_LISTENING = re.compile(r"listening: http=(\S+) monitor=(\S+)")


def controller_command() -> list[str]:
    script = Path(sys.executable).parent / "lmcache_controller"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "lmcache_rs.controller"]


class ControllerProcess:
    """``lmcache_controller`` on 127.0.0.1 with OS-chosen ports; use as a context manager."""

    def __init__(self, *args: str, config: dict | None = None, env: dict | None = None):
        self.args = list(args)
        self.config = config
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.http_port = 0
        self.monitor_port = 0
        self._dir = tempfile.TemporaryDirectory()
        self.log_path = Path(self._dir.name) / "controller.log"
        self.started_in = 0.0

    def __enter__(self) -> "ControllerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._dir.cleanup()

    def start(self, http_port: int = 0, monitor_port: int = 0) -> None:
        cmd = controller_command() + ["--host", "127.0.0.1", "--port", str(http_port),
                                      "--monitor-port", str(monitor_port), *self.args]
        if self.config is not None:
            import yaml

            path = Path(self._dir.name) / "config.yaml"
            path.write_text(yaml.safe_dump(self.config))
            cmd += ["--config", str(path)]
        env = dict(os.environ)
        env.pop("LMCACHE_CONFIG_FILE", None)
        env["PYTHONPATH"] = str(REPO / "python") + os.pathsep + env.get("PYTHONPATH", "")
        env.update(self.env or {})
        offset = len(self.log())
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            m = _LISTENING.search(self.log()[offset:])
            if m and self.proc.poll() is None:
                self.started_in = time.monotonic() - t0
                self.http_port = int(m.group(1).rsplit(":", 1)[1].split(",")[0])
                # a replica has no monitor port (monitor=none)
                self.monitor_port = 0 if m.group(2) == "none" else int(m.group(2).rsplit(":", 1)[1].split(",")[0])
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"controller did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
