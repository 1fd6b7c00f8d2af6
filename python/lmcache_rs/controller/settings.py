"""Controller settings: command-line flags, the shared YAML config, and their defaults.

Chunk size and hash seed come from the same YAML file the workers read (``chunk_size``,
``hash_seed``); a worker whose ``hello`` disagrees is refused. Every limit here has a
flag; the defaults are listed in docs/controller.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Any, Mapping


from ..config import API_KEY_ENV, ENV_PREFIX, parse_value, read_file_values
from ..wire import DEFAULT_MAX_FRAME_BYTES


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
    # keys of full syncs in progress (and events sent during them), all workers together, held
    # until each sync_end applies them at once; a sync that would go over is refused
    max_sync_bytes: int = 256 * 1024 * 1024
    sync_timeout: float = 120.0  # a full sync not ended within this is abandoned (the worker syncs again)
    # commands to workers
    command_timeout: float = 30.0
    event_history: int = 10000  # finished async events remembered for /check_finish
    # index snapshot: loaded at start, written every snapshot_interval s (when changed) and at shutdown
    snapshot: str | None = None
    snapshot_interval: float = 60.0
    log_level: str = "INFO"
    # LMCache workers (LMCache's own protocol, docs/lmcache-compat.md): its socket names -> ports
    # (pull, reply, heartbeat; 0 picks a free port); None: not served
    monitor_ports: dict[str, int] | None = None
    none_hash: int = 0  # NONE_HASH of LMCache's key space (see resolve_none_hash)
    none_hash_origin: str = "given"
    worker_host_override: str | None = None  # dial this host instead of the IP a worker reports
    lmcache_worker_timeout: float = 300.0  # a heartbeating worker silent this long is gone
    lmcache_probe_interval: float = 10.0  # workers without heartbeats get a health probe this often
    lmcache_max_command_failures: int = 3  # commands failed in a row before a worker counts as dead
    lmcache_max_message_bytes: int = 64 * 1024 * 1024  # ZMQ_MAXMSGSIZE of every LMCache socket
    lmcache_max_sync_keys: int = 16 * 1024 * 1024  # keys one full sync may hold in memory
    # engines' KV-cache event streams (vLLM, SGLang; docs/kv-events.md): one dict per subscription
    kv_events: list = dataclasses.field(default_factory=list)
    kv_events_max_message_bytes: int = 64 * 1024 * 1024  # ZMQ_MAXMSGSIZE of the event sockets
    kv_events_replay_timeout: float = 10.0  # a replay socket silent this long has failed
    kv_events_idle_check: float = 5.0  # a publisher quiet this long is asked (once) for a lost tail
    kv_events_max_replay: int = 1_000_000  # messages one replay may return
    kv_events_max_publishers: int = 10_000  # distinct (subscription, topic) pairs remembered
    # key_space_check.py: sampled full-chunk lookups matching no LMCache worker before the
    # mismatch warning (0: no check), one sample per HTTP loop per interval
    lmcache_key_check_lookups: int = 30
    lmcache_key_check_interval: float = 1.0
    # replicas (docs/replicas.md): "single" (everything in one process), "ingest" (sources ->
    # the NATS JetStream log) or "replica" (log -> index -> HTTP API)
    role: str = "single"
    nats_url: str = "nats://127.0.0.1:4222"
    # fault injection for tests: the fraction of log messages the ingest publishes twice
    # (same message id: the stream must drop the copy)
    ingest_resend_fraction: float = 0.0

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
                     "max_hello_frame_bytes", "max_monitor_connections", "max_sync_bytes", "http_threads"):
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
        if self.monitor_ports is not None:
            check_monitor_ports(self.monitor_ports)
            taken = {self.port, self.monitor_port} - {0}
            for name, port in self.monitor_ports.items():
                if port and port in taken:
                    raise ValueError(f"monitor_ports {name!r} port {port} is already used by another socket")
                taken.add(port)
        if not -(2**63) <= self.none_hash < 2**63:
            raise ValueError(f"none_hash must be a signed 64-bit integer, got {self.none_hash}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role == "ingest" and self.snapshot:
            raise ValueError("--snapshot is for roles single and replica; an ingest rebuilds its index from the log")
        if not 0.0 <= self.ingest_resend_fraction <= 1.0:
            raise ValueError(f"ingest_resend_fraction must be within 0..1, got {self.ingest_resend_fraction}")
        if self.lmcache_key_check_lookups < 0:
            raise ValueError(f"lmcache_key_check_lookups must be 0 (off) or positive, got {self.lmcache_key_check_lookups}")
        self.kv_events = [parse_subscription(spec) for spec in self.kv_events]
        for name in ("lmcache_max_command_failures", "lmcache_max_message_bytes", "lmcache_max_sync_keys",
                     "kv_events_max_message_bytes", "kv_events_max_replay", "kv_events_max_publishers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("keepalive_timeout", "request_timeout", "heartbeat_interval", "heartbeat_timeout",
                     "hello_timeout", "sync_timeout", "command_timeout", "snapshot_interval", "lmcache_worker_timeout",
                     "lmcache_probe_interval", "lmcache_key_check_interval", "kv_events_replay_timeout",
                     "kv_events_idle_check"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


ROLES = ("single", "ingest", "replica")

SUBSCRIPTION_KEYS = {"bind", "connect", "replay_endpoint", "topic", "instance_id", "model"}


def parse_subscription(spec: Any) -> dict:
    """Check one subscription's settings (a JSON object); raises ValueError naming the problem."""
    if not isinstance(spec, dict):
        raise ValueError(f"a kv_events subscription is a JSON object, got {spec!r}")
    unknown = set(spec) - SUBSCRIPTION_KEYS
    if unknown:
        raise ValueError(f"kv_events: unknown keys {sorted(unknown)} (known: {sorted(SUBSCRIPTION_KEYS)})")
    if ("bind" in spec) == ("connect" in spec):
        raise ValueError("kv_events: give exactly one of 'bind' (engines connect to us) or 'connect' (to an engine)")
    for key in SUBSCRIPTION_KEYS:
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"kv_events: {key!r} must be a string")
    for key in ("bind", "connect", "replay_endpoint"):
        if key in spec and not re.match(r"^(tcp|ipc|inproc)://.+", spec[key]):
            raise ValueError(f"kv_events: {key!r} must be a ZMQ endpoint like tcp://127.0.0.1:5557, got {spec[key]!r}")
    return dict(spec)


def parse_kv_events(text: str) -> list[dict]:
    """``--kv-events``: one subscription (a JSON object) or several (a JSON list)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"kv_events is not JSON ({exc}): {text!r}") from None
    specs = value if isinstance(value, list) else [value]
    return [parse_subscription(spec) for spec in specs]


MONITOR_PORT_NAMES = ("pull", "reply", "heartbeat")
DEFAULT_MONITOR_PORTS = {"pull": 8300, "reply": 8400}  # LMCache's controller's defaults
CONTROLLER_ENV_PREFIX = "LMCACHE_CONTROLLER_"  # LMCache's controller reads its keys from these


# LMCache's controller's own config: a YAML file named by $LMCACHE_CONTROLLER_CONFIG_FILE (its
# --config), and $LMCACHE_CONTROLLER_<KEY> variables, key -> our setting.
LMCACHE_CONTROLLER_CONFIG_ENV = "LMCACHE_CONTROLLER_CONFIG_FILE"
LMCACHE_CONTROLLER_KEYS = {"controller_monitor_ports": "monitor_ports", "controller_host": "host",
                           "controller_port": "port", "lmcache_worker_timeout": "lmcache_worker_timeout",
                           "health_check_interval": "lmcache_probe_interval"}


def lmcache_controller_values(env: Mapping[str, str], given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Our settings from LMCache's controller config: its file, then its variables (as LMCache
    reads them), except those of ``given`` (set by flags). ``health_check_interval`` (-1: off)
    is our probe interval of LMCache workers without heartbeats, which stays on. Raises
    ValueError naming the key and value."""
    raw: dict[str, Any] = {}
    path = env.get(LMCACHE_CONTROLLER_CONFIG_ENV)
    if path:
        import yaml

        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"${LMCACHE_CONTROLLER_CONFIG_ENV}: cannot read {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"${LMCACHE_CONTROLLER_CONFIG_ENV}: {path} is not a mapping of keys to values")
        raw.update((k, v) for k, v in loaded.items() if k in LMCACHE_CONTROLLER_KEYS)
    for key in LMCACHE_CONTROLLER_KEYS:
        if env.get(CONTROLLER_ENV_PREFIX + key.upper()):  # (an empty variable is unset)
            raw[key] = env[CONTROLLER_ENV_PREFIX + key.upper()]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if LMCACHE_CONTROLLER_KEYS[key] in given or value is None:
            continue
        try:
            if key == "controller_monitor_ports":
                # a string as the flag reads it ("none": no LMCache sockets)
                out["monitor_ports"] = parse_monitor_ports(value) if isinstance(value, str) else check_monitor_ports(value)
            elif key == "controller_host":
                out["host"] = str(value)
            elif key == "controller_port":
                out["port"] = int(value)
            elif key == "lmcache_worker_timeout":
                out["lmcache_worker_timeout"] = float(value)
            elif float(value) > 0:  # health_check_interval
                out["lmcache_probe_interval"] = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"LMCache controller config {key}: bad value {value!r} ({exc})") from None
    return out


def check_monitor_ports(ports: Any) -> dict[str, int]:
    if not isinstance(ports, dict) or not ports:
        raise ValueError(f"monitor_ports must be a JSON object like {json.dumps(DEFAULT_MONITOR_PORTS)}, got {ports!r}")
    for name, port in ports.items():
        if name not in MONITOR_PORT_NAMES:
            raise ValueError(f"monitor_ports: unknown socket {name!r} (known: {', '.join(MONITOR_PORT_NAMES)})")
        if type(port) is not int or not 0 <= port <= 65535:
            raise ValueError(f"monitor_ports: {name!r} must be a TCP port (0-65535), got {port!r}")
    if "pull" not in ports:
        raise ValueError("monitor_ports needs a 'pull' port: LMCache workers push their reports there")
    return ports


def parse_monitor_ports(text: str) -> dict[str, int] | None:
    """``--monitor-ports``: LMCache's JSON object, or ``none``/``off`` to serve no LMCache worker."""
    if text.strip().lower() in ("none", "off", ""):
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"monitor_ports is not JSON ({exc}): {text!r}") from None
    return check_monitor_ports(value)


def resolve_none_hash(value: str, env: Mapping[str, str], siphash: str = "siphash13") -> tuple[int, str]:
    """LMCache's NONE_HASH: an integer as given, or ``auto`` as an LMCache worker inside vLLM
    derives it: Python's hash of the string $PYTHONHASHSEED (0 without the variable, as for a
    worker without vLLM). Returns (value, how it was derived)."""
    text = value.strip().lower()
    if text != "auto":
        try:
            return int(text, 0), "given"
        except ValueError:
            raise ValueError(f"none_hash must be 'auto' or an integer, got {value!r}") from None
    seed = env.get("PYTHONHASHSEED")
    if seed is None or seed == "random":
        return 0, "PYTHONHASHSEED is not set: 0, as LMCache workers without vLLM use"
    try:
        seed_value = int(seed)
    except ValueError:
        raise ValueError(f"PYTHONHASHSEED must be an integer, got {seed!r}") from None
    from .. import python_str_hash

    return python_str_hash(seed, seed_value, siphash), f"hash({seed!r}) under PYTHONHASHSEED={seed}"


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


def _version() -> str:
    import platform

    from .. import __version__

    return f"lmcache_controller {__version__} (Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="lmcache_controller",
        description="KV-cache lookup controller: HTTP API on --port, workers on --monitor-port. "
        "Every flag is described with its unit and default in docs/controller.md.",
    )
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("--host",
                   help="address to listen on, for every socket (default %s: this machine only; "
                   "0.0.0.0 for every interface; or LMCache's controller_host)" % d.host)
    p.add_argument("--port", type=int,
                   help="HTTP port; 0 picks a free one (default %s, or LMCache's controller_port)" % d.port)
    p.add_argument("--monitor-port", type=int, default=d.monitor_port,
                   help="port our workers report on; 0 picks a free one (default %(default)s)")
    p.add_argument("--config", help="the workers' YAML config, for chunk_size, hash_seed, controller_api_key and "
                   "max_frame_bytes (default $LMCACHE_CONFIG_FILE, else none)")
    p.add_argument("--chunk-size", type=int, help="tokens per chunk; overrides the config's chunk_size "
                   "(default: the config's, else 256)")
    p.add_argument("--hash-seed", type=int, help="seed of the xxh3 chunk keys; overrides the config's hash_seed "
                   "(default: the config's, else 0)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help="largest HTTP request body in bytes; larger gets 413 (default %(default)s = 16 MiB)")
    p.add_argument("--max-buffered-body-bytes", type=int, default=d.max_buffered_body_bytes,
                   help="request-body bytes all HTTP connections together may hold while receiving; a request "
                   "that would go over gets 503 with Retry-After (default %(default)s = 256 MiB)")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help="largest request line + headers in bytes; more gets 431 (default %(default)s = 16 KiB)")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open HTTP connections; one more is answered 503 and closed (default %(default)s)")
    p.add_argument("--keepalive-timeout", type=float, default=d.keepalive_timeout,
                   help="seconds an idle keep-alive connection stays open (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds a request has to arrive in full, else 408 and close (default %(default)s)")
    p.add_argument("--max-pipelined", type=int, default=d.max_pipelined,
                   help="queued pipelined responses per connection at which reading pauses (default %(default)s)")
    p.add_argument("--http-threads", type=int, default=d.http_threads,
                   help="event loops (threads) accepting HTTP with SO_REUSEPORT; /lookup runs on all of them, "
                   "the rest on the main loop (default %(default)s)")
    p.add_argument("--max-frame-bytes", type=int,
                   help="largest monitor frame in bytes; larger gets error frame_too_large and a close "
                   f"(default: the config's max_frame_bytes, else {d.max_frame_bytes} = 64 MiB)")
    p.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval,
                   help="seconds between worker heartbeats, told to workers in welcome (default %(default)s)")
    p.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout,
                   help="seconds a worker may be silent, or disconnected without coming back, before it is "
                   "removed (default %(default)s)")
    p.add_argument("--hello-timeout", type=float, default=d.hello_timeout,
                   help="seconds a monitor connection has to say hello (default %(default)s)")
    p.add_argument("--max-hello-frame-bytes", type=int, default=d.max_hello_frame_bytes,
                   help="largest monitor frame in bytes before a hello is accepted (default %(default)s = 64 KiB)")
    p.add_argument("--max-monitor-connections", type=int, default=d.max_monitor_connections,
                   help="open monitor connections; one more gets error too_many_connections (default %(default)s)")
    p.add_argument("--command-timeout", type=float, default=d.command_timeout,
                   help="seconds a worker has to answer a command before the endpoint answers 502 "
                   "(default %(default)s)")
    p.add_argument("--max-sync-bytes", type=int, default=d.max_sync_bytes,
                   help="bytes of keys held for full syncs in progress, all workers together; a sync frame that "
                   "would go over gets error sync_too_large (default %(default)s = 256 MiB)")
    p.add_argument("--sync-timeout", type=float, default=d.sync_timeout,
                   help="seconds a worker's full sync may take before it is abandoned and the worker asked for a "
                   "new one (default %(default)s)")
    p.add_argument("--api-key", help="key workers must send in hello and HTTP clients with the endpoints that "
                   "change state (default $LMCACHE_API_KEY, "
                   "else the config's controller_api_key; none: no key needed)")
    p.add_argument("--snapshot", metavar="PATH", help="index snapshot: loaded at start when present, "
                   "written every --snapshot-interval seconds when changed and at shutdown (default: none)")
    p.add_argument("--snapshot-interval", type=float, default=d.snapshot_interval,
                   help="seconds between snapshot writes, when the index changed (default %(default)s)")
    p.add_argument("--log-level", default=d.log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log lines at this level and above, to stderr (default %(default)s)")
    g = p.add_argument_group("LMCache workers", "unchanged LMCache instances (enable_controller: True) report "
                             "on LMCache's own sockets; see docs/lmcache-compat.md")
    g.add_argument("--monitor-ports", default=None,
                   help="LMCache's controller sockets as JSON, e.g. '{\"pull\": 8300, \"reply\": 8400, "
                   "\"heartbeat\": 8082}' (0: a free port), or 'none' (default %s, or "
                   "$LMCACHE_CONTROLLER_MONITOR_PORTS)" % json.dumps(DEFAULT_MONITOR_PORTS).replace("%", "%%"))
    g.add_argument("--none-hash", default=None,
                   help="NONE_HASH of LMCache's key space: 'auto' (Python's hash of $PYTHONHASHSEED, as LMCache "
                   "inside vLLM derives it; 0 without the variable) or an integer (0 for LMCache without vLLM); "
                   "default auto, or $LMCACHE_CONTROLLER_NONE_HASH")
    g.add_argument("--worker-python", choices=["3.10", "3.11+"],
                   help="Python version of the LMCache workers, for 'auto' (3.10 hashes str with SipHash-2-4, "
                   "3.11+ with SipHash-1-3; default 3.11+, or $LMCACHE_CONTROLLER_WORKER_PYTHON)")
    g.add_argument("--worker-host-override", default=None,
                   help="dial LMCache workers' command ports at this host instead of the IP they report "
                   "(e.g. 127.0.0.1 on one host; default: the reported IP, or "
                   "$LMCACHE_CONTROLLER_WORKER_HOST_OVERRIDE)")
    g.add_argument("--lmcache-worker-timeout", type=float,
                   help="seconds without a heartbeat after which a heartbeating LMCache worker is removed "
                   "(default %s, or LMCache's lmcache_worker_timeout)" % d.lmcache_worker_timeout)
    g.add_argument("--lmcache-probe-interval", type=float,
                   help="seconds between health probes of LMCache workers that send no heartbeats; "
                   f"{d.lmcache_max_command_failures} failed in a row remove the worker (default "
                   f"{d.lmcache_probe_interval:g}, or LMCache's health_check_interval when above 0)")
    e = p.add_argument_group("engine KV-cache events", "vLLM and SGLang engines' KV-cache event streams "
                             "(--kv-events-config on the engine); see docs/kv-events.md")
    e.add_argument("--kv-events", action="append", default=None, metavar="JSON",
                   help="a subscription: '{\"bind\": \"tcp://127.0.0.1:5557\", \"replay_endpoint\": "
                   "\"tcp://127.0.0.1:5558\", \"topic\": \"\", \"instance_id\": \"pod-a\", \"model\": \"m\"}' "
                   "('connect' instead of 'bind' dials an engine's PUB); repeat it, or give a JSON list "
                   "(default: none, or $LMCACHE_CONTROLLER_KV_EVENTS)")
    e.add_argument("--kv-events-replay-timeout", type=float, default=d.kv_events_replay_timeout,
                   help="seconds a replay socket may stay silent before the replay counts as failed "
                   "(default %(default)s)")
    e.add_argument("--kv-events-idle-check", type=float, default=d.kv_events_idle_check,
                   help="seconds a publisher may be quiet before its replay socket is asked for messages lost "
                   "at the end of its stream (default %(default)s)")
    g.add_argument("--lmcache-key-check-lookups", type=int, default=d.lmcache_key_check_lookups,
                   help="warn (and show state 'mismatch' in /metrics) when this many sampled lookups of a full "
                   "chunk or more matched nothing LMCache workers hold while they hold chunks: the key-space "
                   "settings likely differ from the workers'; one sample a second; 0: no check "
                   "(default %(default)s)")
    r = p.add_argument_group("replicas", "one ingest writes a NATS JetStream log, replicas follow it and "
                             "answer lookups; see docs/replicas.md")
    r.add_argument("--role", default=d.role, choices=list(ROLES),
                   help="single: one process does everything (default); ingest: read the sources and publish "
                   "index operations to the log; replica: follow the log and serve the HTTP API")
    r.add_argument("--nats-url", default=None,
                   help="NATS server of the log (default %s, or $LMCACHE_CONTROLLER_NATS_URL)" % d.nats_url)
    return p


def settings_from_args(argv: list[str] | None = None) -> Settings:
    """Parse flags (and the config file they name). Raises ValueError on a bad value."""
    args = build_parser().parse_args(argv)
    d = Settings()
    # LMCache's controller config where a flag does not say otherwise
    flags = {"host": args.host, "port": args.port, "monitor_ports": args.monitor_ports,
             "lmcache_worker_timeout": args.lmcache_worker_timeout, "lmcache_probe_interval": args.lmcache_probe_interval}
    lmc = lmcache_controller_values(os.environ, frozenset(k for k, v in flags.items() if v is not None))

    def pick(flag: Any, name: str) -> Any:
        return flag if flag is not None else lmc.get(name, getattr(d, name))

    s = Settings(
        host=pick(args.host, "host"),
        port=pick(args.port, "port"),
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
        max_sync_bytes=args.max_sync_bytes,
        sync_timeout=args.sync_timeout,
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
    env = os.environ
    ports = args.monitor_ports if args.monitor_ports is not None else env.get(CONTROLLER_ENV_PREFIX + "MONITOR_PORTS")
    if ports is not None:
        s.monitor_ports = parse_monitor_ports(ports)
    else:
        s.monitor_ports = lmc["monitor_ports"] if "monitor_ports" in lmc else dict(DEFAULT_MONITOR_PORTS)
    none_hash = args.none_hash if args.none_hash is not None else env.get(CONTROLLER_ENV_PREFIX + "NONE_HASH", "auto")
    worker_python = args.worker_python or env.get(CONTROLLER_ENV_PREFIX + "WORKER_PYTHON", "3.11+")
    if worker_python not in ("3.10", "3.11+"):
        raise ValueError(f"worker_python must be 3.10 or 3.11+, got {worker_python!r}")
    # a replica answers for the LMCache key space whenever the log has it
    if s.monitor_ports is not None or args.none_hash is not None or args.role == "replica":
        s.none_hash, s.none_hash_origin = resolve_none_hash(
            none_hash, env, "siphash24" if worker_python == "3.10" else "siphash13")
    s.worker_host_override = args.worker_host_override or env.get(CONTROLLER_ENV_PREFIX + "WORKER_HOST_OVERRIDE")
    s.lmcache_worker_timeout = pick(args.lmcache_worker_timeout, "lmcache_worker_timeout")
    s.lmcache_probe_interval = pick(args.lmcache_probe_interval, "lmcache_probe_interval")
    if args.kv_events is not None:
        s.kv_events = [spec for text in args.kv_events for spec in parse_kv_events(text)]
    elif env.get(CONTROLLER_ENV_PREFIX + "KV_EVENTS"):
        s.kv_events = parse_kv_events(env[CONTROLLER_ENV_PREFIX + "KV_EVENTS"])
    s.kv_events_replay_timeout = args.kv_events_replay_timeout
    s.kv_events_idle_check = args.kv_events_idle_check
    s.lmcache_key_check_lookups = args.lmcache_key_check_lookups
    s.role = args.role
    s.nats_url = args.nats_url or env.get(CONTROLLER_ENV_PREFIX + "NATS_URL", s.nats_url)
    # fault injection for tests only, so no flag
    s.ingest_resend_fraction = float(env.get(CONTROLLER_ENV_PREFIX + "INGEST_RESEND_FRACTION", "0"))
    s.validate()
    return s
