"""``lmcache_controller``: run the controller until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from .settings import Settings, settings_from_args


async def serve(settings: Settings) -> int:
    """Run until a signal (0) or until the controller asks to end (its exit status: an ingest
    fenced by another one, 3)."""
    from .server import Controller

    controller = Controller(settings)
    await controller.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = [loop.create_task(stop.wait()), loop.create_task(controller.exit_requested.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            logging.getLogger("lmcache_rs.controller").info("shutting down")
    finally:
        for task in waits:
            task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await controller.stop()
    return controller.exit_status


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValueError as exc:
        print(f"lmcache_controller: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, settings.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(serve(settings))
    except OSError as exc:  # e.g. the port is taken
        print(f"lmcache_controller: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
