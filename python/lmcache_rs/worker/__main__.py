"""``lmcache_worker``: run one worker (one tensor-parallel rank of an instance) standalone.

    lmcache_worker --config configs/example.yaml [--worker-id N] [--preload FILE]

The config comes from ``--config`` or ``LMCACHE_CONFIG_FILE``, with ``LMCACHE_<KEY>``
overrides. ``--preload`` reads JSON lines, each a list of token ids (or an object with a
"tokens" list), and stores synthetic KV for each (deterministic from the tokens, in the
model shape of the config) before reporting to the controller. Once the ports are bound the
worker prints one line starting with ``lmcache_worker ready`` and runs until SIGINT/SIGTERM,
then says bye to the controller and exits 0. A bad config exits 2 with the reason, and so does
one under which the worker would do nothing: neither reporting to a controller
(``enable_controller``) nor serving commands or peers, unless ``--standalone`` says so; a
worker that reports needs a command port (``lmcache_worker_ports``), or the controller could
not reach it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

from lmcache_rs.config import ConfigError, load_config

log = logging.getLogger("lmcache_rs.worker")
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def read_preload(path: str) -> Iterator[list[int]]:
    """Token lists of a JSON-lines file. Raises ValueError naming the bad line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            if isinstance(value, dict):
                value = value.get("tokens")
            if not isinstance(value, list) or not all(type(t) is int and 0 <= t < 2**32 for t in value):
                raise ValueError(f"{path}:{number}: expected a list of token ids (u32)")
            yield value


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from lmcache_rs import __version__

    parser = argparse.ArgumentParser(prog="lmcache_worker", description="Run a KV-cache worker.")
    parser.add_argument("--version", action="version", version=f"lmcache_worker (lmcache_rs) {__version__}")
    parser.add_argument("--config", help="YAML config (default: $LMCACHE_CONFIG_FILE)")
    parser.add_argument("--worker-id", type=int, default=0,
                        help="tensor-parallel rank, 0..world_size-1 (default 0; world_size is a config key)")
    parser.add_argument("--preload", help="JSON lines of token lists to store synthetic KV for, before reporting "
                        "(default: none)")
    parser.add_argument("--standalone", action="store_true",
                        help="run even though the config neither reports to a controller nor serves commands or "
                        "peers (tests, a store used from Python; default off: such a config exits 2)")
    parser.add_argument("--log-level", type=str.upper, default=os.environ.get("LMCACHE_LOG_LEVEL", "INFO").upper(),
                        choices=LOG_LEVELS, help="log level (default $LMCACHE_LOG_LEVEL, else INFO)")
    args = parser.parse_args(argv)
    if args.log_level not in LOG_LEVELS:  # argparse does not check a default against the choices
        parser.error(f"LMCACHE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = load_config(args.config)
        if not 0 <= args.worker_id < config.world_size:
            raise ConfigError(f"--worker-id must be a rank of world_size {config.world_size} "
                              f"(0..{config.world_size - 1}), got {args.worker_id}")
        # this rank's ports, from lists or base + rank: a rank without one is a config error
        worker_port = config.worker_port(args.worker_id)
        p2p_port = config.p2p_port(args.worker_id)
        config.check_command_port(args.worker_id)
        if not (config.enable_controller or worker_port is not None or p2p_port is not None or args.standalone):
            raise ConfigError("this config neither reports to a controller (enable_controller, "
                              "controller_pull_url) nor serves commands or peers (lmcache_worker_ports, "
                              "p2p_init_ports): the worker would do nothing (--standalone runs it anyway)")
    except ConfigError as exc:
        print(f"lmcache_worker: bad configuration: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    from .synthetic import synthetic_for
    from .worker import KVWorker

    try:
        worker = KVWorker(config, args.worker_id, serve=False)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"lmcache_worker: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        if args.preload:
            started = time.monotonic()
            prompts = tokens = stored = 0
            try:
                for prompt in read_preload(args.preload):
                    stored += worker.store(prompt, synthetic_for(config, prompt, salt=args.worker_id))
                    prompts += 1
                    tokens += len(prompt)
                    if prompts % 1000 == 0:
                        log.info("preload: %d prompts, %d tokens stored", prompts, stored)
            except (OSError, ValueError) as exc:
                print(f"lmcache_worker: --preload: {exc}", file=sys.stderr)
                return 2
            log.info(
                "preload: %d prompts, %d of %d tokens stored in %.2f s",
                prompts, stored, tokens, time.monotonic() - started,
            )
        try:
            worker.start_services()
        except OSError as exc:
            print(f"lmcache_worker: cannot listen: {exc}", file=sys.stderr)
            return 1
        info = worker.info()
        reports_to = "{}:{}".format(*config.controller_address()) if config.enable_controller else "none"
        if not config.enable_controller and config.controller_pull_url:
            reports_to += " (controller_pull_url is set but enable_controller is off)"
        print(
            f"lmcache_worker ready: instance={info['instance_id']} worker={info['worker_id']} "
            f"reports_to={reports_to} worker_port={info['worker_port']} p2p_port={info['p2p_port']} "
            f"chunks={worker.health()['chunks']} pool={info['pool']['slots']}x{info['pool']['slot_bytes']}B "
            f"({info['pool']['pinned']})",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        log.info("stopping")
        return 0
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
