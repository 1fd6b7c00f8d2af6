"""The controller's commands to a worker (docs/protocol.md, "Command connection").

:func:`command_handlers` maps each ``op`` to the store call that does it, for the session
layer (``lmcache_rs.wire.session``): arguments are checked here (a ValueError answers
``ok: false`` with ``code: "bad_args"``), and each command runs in the given thread pool so
the event loop never waits for a copy or a disk write.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Awaitable, Callable, Optional

from lmcache_rs.wire.framing import unpack_u32s

from .store import KVStore

# fetch(tokens, (host, p2p_port), location) -> {"chunks", "tokens"}
Fetch = Callable[[list[int], tuple[str, int], str], dict[str, int]]
# send the events recorded so far now; the seq of the frame that carries them, or None
FlushEvents = Callable[[], Optional[int]]


def command_handlers(
    store: KVStore,
    executor: concurrent.futures.Executor,
    fetch: Fetch,
    flush_events: FlushEvents,
) -> dict[str, Callable[[dict], Any]]:
    """The handler table of the command server."""

    def in_pool(fn: Callable[[dict], Any]) -> Callable[[dict], Awaitable[Any]]:
        def handler(args: dict) -> Awaitable[Any]:
            return asyncio.get_running_loop().run_in_executor(executor, fn, args)

        return handler

    async def clear(args: dict) -> dict:
        # The evictions go out at once, and the reply says in which report frame: the
        # controller waits for that frame instead of clearing its index itself, which would
        # also wipe what this worker stores between the clear and the reply reaching it. The
        # clear runs in the pool; the flush runs here, on the loop that owns the report link.
        location = _location(args)
        cleared = await asyncio.get_running_loop().run_in_executor(executor, store.clear, location)
        return {"cleared": cleared, "seq": flush_events()}

    def fetch_command(args: dict) -> dict[str, int]:
        source = args.get("source")
        if (
            not isinstance(source, (list, tuple))
            or len(source) != 2
            or not isinstance(source[0], str)
            or type(source[1]) is not int
        ):
            raise ValueError('fetch needs "source" as [host, p2p_port]')
        return fetch(_tokens(args), (source[0], source[1]), _location(args) or "LocalCPUBackend")

    ops: dict[str, Callable[[dict], Any]] = {
        "health": lambda args: store.health(),
        "pin": lambda args: {"chunks": store.pin(_tokens(args), _location(args))},
        "unpin": lambda args: {"chunks": store.unpin(_tokens(args), _location(args))},
        "lookup": lambda args: {"matched": store.lookup(_tokens(args))},
        "evict": lambda args: {"chunks": store.evict(_tokens(args), _location(args))},
        "compress": lambda args: store.compress(_tokens(args), _method(args), _location(args)),
        "decompress": lambda args: store.decompress(_tokens(args), _method(args), _location(args)),
        "fetch": fetch_command,
    }
    handlers: dict[str, Callable[[dict], Any]] = {op: in_pool(fn) for op, fn in ops.items()}
    handlers["clear"] = clear
    return handlers


def _tokens(args: dict) -> list[int]:
    tokens = args.get("tokens")
    if isinstance(tokens, (bytes, bytearray)):
        return list(unpack_u32s(bytes(tokens)))
    if isinstance(tokens, list) and all(type(t) is int and 0 <= t < 2**32 for t in tokens):
        return tokens
    raise ValueError('"tokens" must be packed little-endian u32 (bin)')


def _location(args: dict) -> Optional[str]:
    location = args.get("location")
    if location is not None and not isinstance(location, str):
        raise ValueError('"location" must be a string or nil')
    return location


def _method(args: dict) -> Optional[str]:
    method = args.get("method")
    if method is not None and not isinstance(method, str):
        raise ValueError('"method" must be a string or nil')
    return method
