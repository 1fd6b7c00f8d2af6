"""Peer-to-peer chunk transfer (docs/protocol.md, "P2P").

A peer sends ``{"t": "get", "id", "keys"}``; the server answers, per key it holds, one
``{"t": "chunk", "id", "key", "dtype", "shape", "nbytes", "checksum"}`` frame followed by exactly
``nbytes`` raw bytes, then ``{"t": "end", "id", "missing"}``.

Both sides use blocking sockets in their own threads rather than the event loop: the server
sends straight from pool memory (or ``sendfile`` from the disk tier) and ``sendall`` returning
means the kernel has the bytes, so the chunk's reader count can be dropped safely; the
receiver reads straight into reserved pool slots with ``recv_into``. The receiver checks every
length and xxh3-64 checksum and commits nothing unless the whole transfer checks out.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import msgpack
import xxhash

from lmcache_rs.wire.auth import AUTH, AUTH_TIMEOUT, MAX_AUTH_FRAME_BYTES, UNAUTHORIZED, auth_frame, check_first_frame
from lmcache_rs.wire.framing import FrameError, decode_body, encode_frame, pack_u64s, unpack_u64s

from ..log_limit import RateLimitedLog
from .store import ChunkExport, KVStore, dtype_from_name, dtype_name

log = logging.getLogger("lmcache_rs.worker.p2p")
log_refusal = RateLimitedLog(log)  # a bad peer can cause these as fast as it connects

_HEADER_BYTES = 4


class TransferError(RuntimeError):
    """A P2P transfer was refused, cut short or corrupt; nothing from it was stored."""


# -- blocking framed socket --------------------------------------------------------------------
READ_PIECE = 1 << 16  # a frame body grows by at most this much per read: memory follows the bytes


class FramedSocket:
    """Frames and raw byte runs over one blocking socket.

    ``frame_timeout``: once a frame has started, all of it must arrive within this many
    seconds (a slow peer is cut); None waits as long as the socket's own timeout allows.
    """

    def __init__(self, sock: socket.socket, max_frame_bytes: int, frame_timeout: Optional[float] = None):
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self.frame_timeout = frame_timeout

    def read_exact(self, out: memoryview) -> int:
        """Fill ``out``; returns the bytes read (less than len(out) only at end of stream)."""
        got = 0
        while got < len(out):
            n = self.sock.recv_into(out[got:])
            if n == 0:
                break
            got += n
        return got

    def read_frame(self, idle_timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
        """The next message; None at a clean end of stream. ``idle_timeout``: how long to wait
        for a frame to start (None: the socket's timeout). Raises FrameError, TransferError,
        or OSError (socket.timeout) when the peer is idle or slow past its time."""
        if idle_timeout is not None:
            self.sock.settimeout(idle_timeout)
        first = self.sock.recv(_HEADER_BYTES)
        if not first:
            return None
        deadline = None if self.frame_timeout is None else time.monotonic() + self.frame_timeout
        header = bytearray(first)
        while len(header) < _HEADER_BYTES:
            piece = self._recv(_HEADER_BYTES - len(header), deadline)
            if not piece:
                raise TransferError("connection closed inside a frame header")
            header += piece
        length = int.from_bytes(header, "big")
        if length > self.max_frame_bytes:
            raise FrameError("frame_too_large", f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes}")
        body = bytearray()  # grown as bytes arrive: a claimed length costs nothing until it is sent
        while len(body) < length:
            piece = self._recv(min(length - len(body), READ_PIECE), deadline)
            if not piece:
                raise TransferError("connection closed inside a frame")
            body += piece
        return decode_body(bytes(body))

    def _recv(self, n: int, deadline: Optional[float]) -> bytes:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the peer is too slow to send a frame")
            self.sock.settimeout(left)
        return self.sock.recv(n)

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(message))


# -- server ------------------------------------------------------------------------------------
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 60.0  # s a peer connection may wait between requests
IO_TIMEOUT = 30.0  # s a frame may take to arrive, and a send may block on a peer that does not read


class P2PServer:
    """Serves this worker's chunks to peers; one thread per peer connection, at most
    ``max_connections`` of them (one more gets ``too_many_connections``). With ``api_key`` a
    connection's first frame must prove it (wire/auth.py). A peer idle for ``idle_timeout``
    or slower than ``io_timeout`` to send a frame or take our bytes is cut."""

    def __init__(self, store: KVStore, host: str, port: int, max_frame_bytes: int, *, api_key: Optional[str] = None,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT,
                 io_timeout: float = IO_TIMEOUT):
        self.store = store
        self.max_frame_bytes = max_frame_bytes
        self.api_key = api_key
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.io_timeout = io_timeout
        self.listener = socket.create_server((host, port), backlog=64)
        self.listener.settimeout(0.2)
        self.host = host
        self.port = self.listener.getsockname()[1]
        self._closing = False
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"lmcache-p2p-{self.port}", daemon=True)

    def start(self) -> None:
        self._acceptor.start()

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def close(self) -> None:
        self._closing = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        except OSError:
            pass
        self._acceptor.join()
        self.listener.close()
        with self._lock:
            connections = list(self._connections.items())
        for conn, _thread in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _conn, thread in connections:
            thread.join()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, _addr = self.listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if self._closing:
                    return
                continue
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    thread = threading.Thread(target=self._serve, args=(conn,), name="lmcache-p2p-conn", daemon=True)
                    self._connections[conn] = thread
            if full:
                self._refuse(conn, "too_many_connections", f"this worker serves at most {self.max_connections} peers")
                continue
            thread.start()

    def _refuse(self, conn: socket.socket, code: str, message: str) -> None:
        log_refusal("p2p: refusing a peer: %s", code)
        try:
            conn.settimeout(1.0)
            conn.sendall(encode_frame({"t": "error", "code": code, "message": message}))
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        authenticated = self.api_key is None
        # a stranger's first frame is small (the auth frame) and comes soon; full size once proven
        framed = FramedSocket(conn, self.max_frame_bytes if authenticated else min(self.max_frame_bytes, MAX_AUTH_FRAME_BYTES),
                              frame_timeout=self.io_timeout)
        try:
            while not self._closing:
                try:
                    message = framed.read_frame(
                        idle_timeout=self.idle_timeout if authenticated else min(self.idle_timeout, AUTH_TIMEOUT))
                    if message is None:
                        return
                    conn.settimeout(self.io_timeout)  # for our sends: a peer that stops reading is cut
                    if not authenticated:
                        assert self.api_key is not None
                        if not check_first_frame(message, self.api_key):
                            raise FrameError(UNAUTHORIZED, "the first frame must be auth with the API key")
                        authenticated = True
                        framed.max_frame_bytes = self.max_frame_bytes
                        continue
                    if message["t"] == AUTH:
                        continue  # a key this worker does not ask for
                    if message["t"] != "get":
                        raise FrameError("unknown_type", f"unexpected frame type {message['t']!r} on a P2P connection")
                    request_id, keys = message.get("id"), message.get("keys")
                    if type(request_id) is not int or not isinstance(keys, bytes):
                        raise FrameError("bad_field", 'get needs an integer "id" and "keys" as bin')
                    keys = unpack_u64s(keys)
                except FrameError as exc:
                    log_refusal("p2p: rejecting frame from a peer: %s: %s", exc.code, exc)
                    framed.send({"t": "error", "code": exc.code, "message": str(exc)})
                    return
                except TransferError:
                    return
                self._answer(framed, request_id, keys)
        except OSError:
            return  # the peer went away, idled or stalled, or a damaged disk chunk cut the transfer
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _answer(self, framed: FramedSocket, request_id: int, keys) -> None:
        missing: list[int] = []
        for key in keys:
            with self.store.export_chunk(key) as chunk:
                if chunk is None:
                    missing.append(key)
                    continue
                checksum = chunk.checksum
                if checksum is None:
                    checksum = xxhash.xxh3_64_intdigest(chunk.data)
                if chunk.file is not None and os.fstat(chunk.file.fileno()).st_size != chunk.nbytes:
                    self._damaged(chunk, "its file is not the size its index entry says")
                framed.send(
                    {"t": "chunk", "id": request_id, "key": key, "dtype": chunk.dtype, "shape": chunk.shape,
                     "nbytes": chunk.nbytes, "checksum": checksum}
                )
                if chunk.file is not None:
                    if framed.sock.sendfile(chunk.file, 0, chunk.nbytes) != chunk.nbytes:
                        self._damaged(chunk, "its file shrank while it was sent")
                else:
                    framed.sock.sendall(chunk.data)
        framed.send({"t": "end", "id": request_id, "missing": pack_u64s(missing)})

    def _damaged(self, chunk: ChunkExport, why: str) -> None:
        """Drop a disk chunk whose file cannot be sent whole and cut the connection (OSError):
        the peer then fails at once rather than wait for bytes that never come."""
        log.warning("p2p: disk chunk %016x is damaged (%s); dropping it", chunk.key, why)
        assert chunk.disk is not None
        self.store.drop_disk_chunk(chunk.disk)
        raise OSError(f"disk chunk {chunk.key:016x} is damaged")


# -- client ------------------------------------------------------------------------------------
@dataclass
class _Landed:
    """A chunk received: in a pool slot that was free, or staged in memory until room is made."""

    key: int
    ntokens: int
    dtype: Any
    slot: Optional[int] = None
    staged: Optional[bytearray] = None


def fetch(
    store: KVStore,
    tokens: list[int],
    source: tuple[str, int],
    location: str,
    *,
    timeout: float = 60.0,
    api_key: Optional[str] = None,
) -> dict[str, int]:
    """Pull the chunks of ``tokens`` this worker lacks at ``location`` from the peer at
    ``source`` (host, p2p_port) and store them there. All or nothing: a refused, short or
    corrupt transfer raises TransferError and stores nothing. Chunks are read straight into
    pool slots that are free; the rest wait in memory, and room is made for them (evicting least
    recently used chunks) only once the whole transfer is in hand and checked, so a failed fetch
    never costs a chunk. With ``api_key`` the connection proves it first (the peer asks for it
    when it has one). Returns {"chunks", "tokens"}."""
    store.check_location(location)
    expected = store.expected_chunks(tokens)
    ntokens_of = dict(expected)
    if location == "LocalDiskBackend":
        store.ensure_on_disk([k for k, _ in expected])
    on_disk = location == "LocalDiskBackend"
    want = [k for k, _ in expected if not store.holds(k, location) and not (on_disk and store.holds(k, "LocalCPUBackend"))]
    if not want:
        if location == "LocalDiskBackend":
            store.flush()
        return {"chunks": 0, "tokens": 0}
    free = store.reserve_free_slots(len(want))
    landed: list[_Landed] = []
    try:
        try:
            with socket.create_connection(source, timeout=timeout) as sock:
                framed = FramedSocket(sock, store.config.max_frame_bytes)
                if api_key is not None:
                    framed.send(auth_frame(api_key))
                framed.send({"t": "get", "id": 1, "keys": pack_u64s(want)})
                _receive(store, framed, want, ntokens_of, free, landed)
        except (OSError, FrameError, msgpack.UnpackException, ValueError) as exc:
            raise TransferError(f"fetch from {source[0]}:{source[1]} failed: {exc}") from None
        staged = [chunk for chunk in landed if chunk.slot is None]
        if staged:  # the bytes are in hand: only now make room
            slots = store.reserve_slots(len(staged), set(ntokens_of))
            if slots is None:
                raise TransferError(f"the CPU pool has no room for {len(staged)} more chunks")
            for chunk, slot in zip(staged, slots):
                assert chunk.staged is not None
                store.slot_memory(slot, len(chunk.staged))[:] = chunk.staged
                chunk.slot, chunk.staged = slot, None
    except BaseException:
        store.release_slots(free + [chunk.slot for chunk in landed if chunk.slot is not None])
        raise
    store.release_slots(free)
    stored = store.commit_received([(c.key, c.ntokens, c.dtype, c.slot) for c in landed], location)
    log.info("p2p: fetched %d chunks (%d new) from %s:%d", len(landed), stored, *source)
    return {"chunks": len(landed), "tokens": sum(c.ntokens for c in landed)}


def _receive(store: KVStore, framed: FramedSocket, want: list[int], ntokens_of: dict[int, int],
             free: list[int], landed: list[_Landed]) -> None:
    """Read the answer to one get: each chunk into one of the ``free`` slots (popped as used)
    or, when none is left, into memory of its size; appended to ``landed`` as it arrives.
    Raises TransferError (or FrameError) on any problem; the caller gives the slots back."""
    pending = set(want)
    while True:
        message = framed.read_frame()
        if message is None:
            raise TransferError("the peer closed the connection before the end of the transfer")
        kind = message["t"]
        if kind == "end":
            if message.get("id") != 1:
                raise TransferError("end frame of another request")
            return
        if kind == "error":
            raise TransferError(f"the peer refused: {message.get('code')}: {message.get('message')}")
        if kind != "chunk":
            raise TransferError(f"unexpected frame {kind!r}")
        key, nbytes, checksum = message.get("key"), message.get("nbytes"), message.get("checksum")
        if message.get("id") != 1 or type(key) is not int or key not in pending:
            raise TransferError(f"chunk {key!r} was not asked for")
        if type(nbytes) is not int or type(checksum) is not int:
            raise TransferError("chunk frame without integer nbytes/checksum")
        dtype = dtype_from_name(message.get("dtype"))
        if dtype != store.dtype:
            raise TransferError(f"chunk {key:016x} is {message.get('dtype')}; this worker holds "
                                f"{dtype_name(store.dtype)} (kv_dtype): a peer of another dtype cannot serve it")
        ntokens = ntokens_of[key]
        shape = list(store.chunk_shape(ntokens))
        if message.get("shape") != shape:
            raise TransferError(f"chunk {key:016x} has shape {message.get('shape')}, expected {shape}")
        if nbytes != store.chunk_nbytes(ntokens, dtype) or nbytes > store.slot_bytes:
            raise TransferError(f"chunk {key:016x}: {nbytes} bytes do not match {shape} of {message.get('dtype')}")
        chunk = _Landed(key, ntokens, dtype)
        if free:
            chunk.slot = free.pop()
            memory = store.slot_memory(chunk.slot, nbytes)
        else:
            chunk.staged = bytearray(nbytes)  # at most one slot, checked above
            memory = memoryview(chunk.staged)
        landed.append(chunk)
        if framed.read_exact(memory) < nbytes:
            raise TransferError(f"transfer truncated inside chunk {key:016x}")
        if xxhash.xxh3_64_intdigest(memory) != checksum:
            raise TransferError(f"checksum mismatch for chunk {key:016x}")
        pending.discard(key)
