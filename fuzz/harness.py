"""What the fuzz targets share: a fake transport, a seeded index, its digest, and the checks.

Every target is a module with ``test_one_input(data: bytes)`` that raises on a finding
(an exception escaping the code under test, a 500 or an ``internal_error`` frame, an
ERROR logged by the controller, a malformed answer, or a rejected input that changed the
index). ``run.py`` drives them under atheris; the smoke test also calls them directly.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "python") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "python"))

CHUNK = 4
SEED = 7
CPU, GPU, DISK = "LocalCPUBackend", "GPU", "LocalDiskBackend"

# Token lists the seeded index holds prefixes of; the digest looks all of them up.
PROMPTS = [
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    [1, 2, 3, 4, 99, 98, 97, 96],
    [7, 7, 7, 7, 7, 7, 7, 7, 7],
    [40000, 40001, 40002, 40003, 40004],
    [5, 4, 3, 2, 1],
]
QUERIES = PROMPTS + [p[: len(p) // 2] for p in PROMPTS] + [[], [1], [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]]


class Finding(AssertionError):
    """A property the code under test broke (atheris reports it as a crash)."""


class FuzzTransport(asyncio.Transport):
    """Records writes; close() calls connection_lost on the next loop iteration, like a socket;
    write_eof() ends our side, after which a write raises, as on a socket."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.eof = False  # our side ended (the server lingers before closing)
        self.reading = True
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 9000)}.get(name, default)

    def write(self, data) -> None:
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")  # as asyncio's transports
        if not self.closed:
            self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return 0


def attach(protocol: asyncio.Protocol) -> FuzzTransport:
    transport = FuzzTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    return transport


def seed_index(index, instances=("inst_a", "inst_b")) -> None:
    """Give the index a fixed content: prefixes of PROMPTS at several locations and workers."""
    from lmcache_rs import chunk_hashes

    events = []
    for n, prompt in enumerate(PROMPTS):
        keys = chunk_hashes(prompt, CHUNK, SEED)
        events.append(("admit", instances[0], 0, (CPU, GPU, DISK)[n % 3], keys))
        events.append(("admit", instances[1], n % 2, CPU, keys[: 1 + n % len(keys)]))
    index.apply_batch(events)


def digest(index) -> tuple:
    """Everything observable about the index: stats, holders, workers and a fixed set of lookups.

    Compared with ``==``; heap bytes are left out (allocator reuse may move them, content may not).
    """
    stats = index.stats()
    stats.pop("bytes", None)
    return (
        sorted(stats.items()),
        sorted(index.holder_counts()),
        sorted((k, sorted(v)) for k, v in index.workers().items()),
        [index.lookup_detailed(q) for q in QUERIES],
    )


class ErrorLog(logging.Handler):
    """Counts ERROR records (log.exception in a handler is a finding); drops the rest."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def check(self) -> None:
        if self.records:
            record = self.records[0]
            self.records.clear()
            text = record.getMessage()
            if record.exc_info:
                import traceback

                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            raise Finding(f"the controller logged an error: {text}")


def quiet_logs() -> ErrorLog:
    """Silence the controller's warnings (every rejected input logs one) but catch its errors."""
    root = logging.getLogger("lmcache_rs")
    root.handlers[:] = []
    handler = ErrorLog()
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    root.propagate = False
    return handler


def new_loop() -> asyncio.AbstractEventLoop:
    """A private loop each target drives with run_until_complete (never the thread's current loop)."""
    return asyncio.new_event_loop()


async def settle(rounds: int = 4) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def parse_http_responses(data: bytes, heads: bool = False) -> list[tuple[int, dict[str, str], bytes]]:
    """Split what the server wrote into responses; raise Finding if it is not well-formed HTTP/1.1.

    ``heads``: the requests may include HEAD, whose answers have a Content-Length and no body.
    Such an answer is recognised by what follows its head: the next status line, or the end
    (no body this server writes starts with a status line)."""
    out = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise Finding(f"truncated response head: {bytes(data[pos:pos + 200])!r}")
        lines = bytes(data[pos:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 3 or parts[0] != "HTTP/1.1" or not parts[1].isdigit():
            raise Finding(f"bad status line {lines[0]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" not in line:
                raise Finding(f"bad header line {line!r}")
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
        pos = end + 4
        if status == 100:
            continue
        if "content-length" not in headers:
            raise Finding(f"response {status} without Content-Length")
        n = int(headers["content-length"])
        if heads and n and (pos == len(data) or data.startswith(b"HTTP/1.1 ", pos)):
            out.append((status, headers, b""))
            continue
        body = bytes(data[pos:pos + n])
        if len(body) != n:
            raise Finding(f"response {status} body shorter than its Content-Length")
        pos += n
        out.append((status, headers, body))
    return out


def split_reads(stream: bytes, n: int, data: bytes) -> list[bytes]:
    """Cut the stream into n + 1 reads at points derived from the input (deterministic)."""
    if n == 0 or len(stream) < 2:
        return [stream]
    points = sorted({(data[i % len(data)] * 131 + i * 977) % len(stream) for i in range(n)})
    pieces, last = [], 0
    for p in points:
        if p > last:
            pieces.append(stream[last:p])
            last = p
    pieces.append(stream[last:])
    return pieces
