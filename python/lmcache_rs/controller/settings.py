"""Controller settings: command-line flags, the shared YAML config, and their defaults.

Chunk size and hash seed come from the same YAML file the workers read (``chunk_size``,
``hash_seed``); a worker whose ``hello`` disagrees is refused. Every limit here has a
flag; the defaults are listed in docs/controller.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Mapping


from ..config import API_KEY_ENV, ENV_PREFIX, parse_value, read_file_values
from ..wire import DEFAULT_MAX_FRAME_BYTES

PROTOCOL_VERSION = 1


@dataclasses.dataclass
class Settings:
    host: str = "127.0.0.1"  # loopback only unless --host says otherwise
    port: int = 9000
    monitor_port: int = 9001
    chunk_size: int = 256
    hash_seed: int = 0
    api_key: str | None = None
    # HTTP limits
    max_body_bytes: int = 16 * 1024 * 1024
    max_buffered_body_bytes: int = 256 * 1024 * 1024  # all request bodies being received, together
    max_header_bytes: int = 16 * 1024
    max_connections: int = 4096
    keepalive_timeout: float = 75.0
    request_timeout: float = 30.0  # a request must arrive in full within this (slow clients)
    max_pipelined: int = 64  # queued responses per connection before reading pauses
    http_threads: int = 1  # event loops (threads) serving HTTP; more spread lookups over cores
    # monitor port
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    hello_timeout: float = 10.0
    # Before a hello is accepted the peer is unknown (and unauthenticated): its frames may be no
    # larger than this, so a stranger cannot make the controller buffer max_frame_bytes.
    max_hello_frame_bytes: int = 64 * 1024
    max_monitor_connections: int = 1024
    # commands to workers
    command_timeout: float = 30.0
    event_history: int = 10000  # finished async events remembered for /check_finish
    # index snapshot: loaded at start, written every snapshot_interval s (when changed) and at shutdown
    snapshot: str | None = None
    snapshot_interval: float = 60.0
    log_level: str = "INFO"

    def validate(self) -> None:
        for name in ("port", "monitor_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} must be a TCP port (0-65535), got {value}")
        if self.port == self.monitor_port != 0:
            raise ValueError(f"port and monitor_port must differ, both are {self.port}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if not 0 <= self.hash_seed < 2**64:
            raise ValueError(f"hash_seed must be an unsigned 64-bit integer, got {self.hash_seed}")
        for name in ("max_body_bytes", "max_buffered_body_bytes", "max_header_bytes", "max_connections", "max_pipelined", "max_frame_bytes",
                     "max_hello_frame_bytes", "max_monitor_connections", "http_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_body_bytes", "max_header_bytes"):  # the /lookup fast path reads them as u32
            if getattr(self, name) > 2**32 - 1:
                raise ValueError(f"{name} must be at most 4294967295 (4 GiB), got {getattr(self, name)}")
        per_loop = self.max_buffered_body_bytes // max(1, self.http_threads)
        if self.max_body_bytes > per_loop:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) must fit in each HTTP loop's share of "
                f"max_buffered_body_bytes ({self.max_buffered_body_bytes} / {self.http_threads} loops = {per_loop})"
            )
        for name in ("keepalive_timeout", "request_timeout", "heartbeat_interval", "heartbeat_timeout",
                     "hello_timeout", "command_timeout", "snapshot_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


# The keys of the workers' config the controller reads (the rest is theirs alone).
SHARED_KEYS = ("chunk_size", "hash_seed", "controller_api_key", "max_frame_bytes")


def read_yaml(path: str) -> dict[str, Any]:
    """The shared keys from the workers' config file, read and parsed exactly as the workers
    read them (lmcache_rs.config). Raises ValueError (ConfigError) on a bad file or value."""
    return {k: v for k, v in read_file_values(path).items() if k in SHARED_KEYS}


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """The controller's keys from ``LMCACHE_<KEY>`` variables, parsed as the workers parse them.
    Raises ValueError (ConfigError) naming the variable's key and value."""
    out = {key: parse_value(key, env[ENV_PREFIX + key.upper()], from_env=True)
           for key in SHARED_KEYS if ENV_PREFIX + key.upper() in env}
    if "controller_api_key" not in out and API_KEY_ENV in env:
        out["controller_api_key"] = env[API_KEY_ENV] or None
    return out


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="lmcache_controller",
        description="KV-cache lookup controller: HTTP API on --port, workers on --monitor-port.",
    )
    p.add_argument("--host", default=d.host,
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=d.port, help="HTTP port (default %(default)s)")
    p.add_argument("--monitor-port", type=int, default=d.monitor_port, help="worker port (default %(default)s)")
    p.add_argument("--config", help="worker YAML config (chunk_size, hash_seed); default $LMCACHE_CONFIG_FILE")
    p.add_argument("--chunk-size", type=int, help="overrides the config's chunk_size (default 256)")
    p.add_argument("--hash-seed", type=int, help="overrides the config's hash_seed (default 0)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-buffered-body-bytes", type=int, default=d.max_buffered_body_bytes,
                   help="request-body bytes all HTTP connections together may hold while receiving; a request "
                   "that would go over gets 503 with Retry-After (default %(default)s)")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes)
    p.add_argument("--max-connections", type=int, default=d.max_connections)
    p.add_argument("--keepalive-timeout", type=float, default=d.keepalive_timeout)
    p.add_argument("--request-timeout", type=float, default=d.request_timeout)
    p.add_argument("--max-pipelined", type=int, default=d.max_pipelined)
    p.add_argument("--http-threads", type=int, default=d.http_threads,
                   help="event loops (threads) accepting HTTP with SO_REUSEPORT; /lookup runs on all of them, "
                   "the rest on the main loop (default %(default)s)")
    p.add_argument("--max-frame-bytes", type=int)
    p.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval)
    p.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout)
    p.add_argument("--hello-timeout", type=float, default=d.hello_timeout)
    p.add_argument("--max-hello-frame-bytes", type=int, default=d.max_hello_frame_bytes,
                   help="largest monitor frame before a hello is accepted (default %(default)s)")
    p.add_argument("--max-monitor-connections", type=int, default=d.max_monitor_connections)
    p.add_argument("--command-timeout", type=float, default=d.command_timeout)
    p.add_argument("--api-key", help="key workers must send in hello and HTTP clients with the endpoints that "
                   "change state (default $LMCACHE_API_KEY, "
                   "else the config's controller_api_key; none: no key needed)")
    p.add_argument("--snapshot", metavar="PATH", help="index snapshot: loaded at start when present, "
                   "written every --snapshot-interval seconds when changed and at shutdown")
    p.add_argument("--snapshot-interval", type=float, default=d.snapshot_interval)
    p.add_argument("--log-level", default=d.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Parse flags (and the config file they name). Raises ValueError on a bad value."""
    args = build_parser().parse_args(argv)
    s = Settings(
        host=args.host,
        port=args.port,
        monitor_port=args.monitor_port,
        max_body_bytes=args.max_body_bytes,
        max_buffered_body_bytes=args.max_buffered_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_connections=args.max_connections,
        keepalive_timeout=args.keepalive_timeout,
        request_timeout=args.request_timeout,
        max_pipelined=args.max_pipelined,
        http_threads=args.http_threads,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        hello_timeout=args.hello_timeout,
        max_hello_frame_bytes=args.max_hello_frame_bytes,
        max_monitor_connections=args.max_monitor_connections,
        command_timeout=args.command_timeout,
        snapshot=args.snapshot,
        snapshot_interval=args.snapshot_interval,
        log_level=args.log_level,
    )
    # The shared keys as the workers read them: the file, then LMCACHE_<KEY> variables (and
    # $LMCACHE_API_KEY for the key, unless $LMCACHE_CONTROLLER_API_KEY is set), then the flags.
    config = args.config or os.environ.get("LMCACHE_CONFIG_FILE")
    values = read_yaml(config) if config else {}
    values.update(env_overrides(os.environ))
    s.chunk_size = values.get("chunk_size", s.chunk_size)
    s.hash_seed = values.get("hash_seed", s.hash_seed)
    s.api_key = values.get("controller_api_key")
    s.max_frame_bytes = values.get("max_frame_bytes", s.max_frame_bytes)
    if args.chunk_size is not None:
        s.chunk_size = args.chunk_size
    if args.hash_seed is not None:
        s.hash_seed = args.hash_seed
    if args.max_frame_bytes is not None:
        s.max_frame_bytes = args.max_frame_bytes
    if args.api_key is not None:
        s.api_key = args.api_key
    if s.api_key == "":
        s.api_key = None
    s.validate()
    return s
