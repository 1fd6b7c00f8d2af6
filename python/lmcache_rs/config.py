"""Configuration of a worker (and the values the controller shares with it).

Sources, lowest priority first:

1. the defaults below;
2. a YAML file: ``--config PATH`` or the ``LMCACHE_CONFIG_FILE`` environment variable
   (the spec's ``example.yaml`` works unchanged);
3. ``LMCACHE_<KEY>`` environment variables, one per key, upper-cased
   (``LMCACHE_CHUNK_SIZE=512``, ``LMCACHE_LOCAL_CPU=false``), parsed to the key's type.

LMCache ignores the environment when a file is given; here the environment overrides single
keys of the file, which is what a launcher script usually wants. An unknown key (in the file
or as an ``LMCACHE_*`` variable) is logged as a warning and ignored; a value of the wrong type
or out of range raises :class:`ConfigError` naming the key and the value, and nothing starts.

Sizes ``max_local_cpu_size`` / ``max_local_disk_size`` are in GB of 1024**3 bytes, as in
LMCache. Ports: an integer is the base port for tensor-parallel rank 0 (rank r uses base + r);
a list gives one port per rank; 0 asks the OS for a free port (tests use this), and the port
actually bound is what the worker reports to the controller.

This module imports neither torch nor the native extension: the controller uses it too.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import yaml

# the controller registers every rank of an instance at its first hello: keep that bounded
MAX_WORLD_SIZE = 1024

# Keys of the /lookup response, which the index refuses as instance ids (rust/holders.rs).
RESERVED_INSTANCE_IDS = frozenset({"event_id", "layout_info", "detail"})

log = logging.getLogger("lmcache_rs.config")

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
# LMCACHE_* variables that are not config keys but are known (not warned about).
API_KEY_ENV = "LMCACHE_API_KEY"  # the controller's --api-key variable; the worker sends the same key
_KNOWN_ENV = {CONFIG_FILE_ENV, "LMCACHE_LOG_LEVEL", API_KEY_ENV}

GB = 1024**3
KV_DTYPES = ("float16", "bfloat16", "float32")
Ports = Union[int, list]


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and the value."""


@dataclass
class LMCacheConfig:
    # -- the spec's example.yaml ------------------------------------------------------------
    chunk_size: int = 256
    """Tokens per chunk; the last, partial chunk of a prompt is a chunk too."""
    local_cpu: bool = True
    """Keep chunks in the CPU pool and report them as LocalCPUBackend. With False the pool is
    only a staging area for the disk tier (local_disk must then be set)."""
    max_local_cpu_size: float = 5.0
    """Size of the CPU pool in GB, allocated once at start."""
    enable_controller: bool = False
    """Report holdings to the controller at controller_pull_url."""
    lmcache_instance_id: str = "lmcache_default_instance"
    world_size: int = 1
    """Tensor-parallel ranks of the instance (worker ids 0..world_size-1); the controller matches
    a chunk for the instance only when every one of them is live and holds it."""
    controller_pull_url: Optional[str] = None
    """host:port of the controller's monitor port (lmcache_controller --monitor-port)."""
    lmcache_worker_ports: Optional[Ports] = None
    """Command port(s) the controller connects to; None: no command server."""
    p2p_host: Optional[str] = None
    p2p_init_ports: Optional[Ports] = None
    """Port(s) peers fetch chunks from; None: no P2P server."""

    # -- disk tier --------------------------------------------------------------------------
    local_disk: Optional[str] = None
    """Directory of the disk tier ("file:///path" as in LMCache, or a plain path)."""
    max_local_disk_size: float = 0.0
    """Disk tier capacity in GB; the tier is on when local_disk is set and this is > 0."""

    # -- controller link --------------------------------------------------------------------
    controller_api_key: Optional[str] = None
    """Sent in hello when set; must match the controller's. $LMCACHE_API_KEY (the variable the
    controller reads) sets it too, unless $LMCACHE_CONTROLLER_API_KEY is given."""
    controller_lookup_url: Optional[str] = None
    """http://host:port of the controller's HTTP API (lmcache_controller --port). The vLLM
    connector asks its /lookup which other instance holds a longer prefix, and fetches it
    from that instance over P2P; None: no cross-instance reuse."""
    lmcache_worker_host: str = "localhost"
    """Host the command server binds to and that the worker announces to the controller."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats (the controller's welcome may set another value)."""
    heartbeat_timeout: float = 5.0
    """Seconds of silence after which the controller drops a worker."""
    report_interval: float = 0.02
    """Seconds the reporter waits to batch admit/evict events into one frame."""
    hash_seed: int = 0
    """Seed of the chained chunk hash; must match the controller's."""
    max_frame_bytes: int = 64 * 1024 * 1024

    # -- model shape of the KV cache (synthetic KV for --preload uses it too) --------------
    num_layers: int = 2
    num_kv_heads: int = 2
    head_dim: int = 16
    kv_dtype: str = "float16"

    # keys met in the sources that are not fields (kept for diagnostics)
    unknown_keys: list = field(default_factory=list, repr=False, compare=False)

    # ---------------------------------------------------------------------------------------
    @property
    def disk_enabled(self) -> bool:
        return bool(self.local_disk) and self.max_local_disk_size > 0

    @property
    def disk_path(self) -> Optional[str]:
        if not self.local_disk:
            return None
        path = self.local_disk
        if path.startswith("file://"):
            path = path[len("file://") :]
        return path

    def kv_bytes_per_token(self) -> int:
        width = 4 if self.kv_dtype == "float32" else 2
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * width

    def controller_address(self) -> tuple[str, int]:
        """(host, port) of controller_pull_url. Raises ConfigError when unset or malformed."""
        return _parse_hostport("controller_pull_url", self.controller_pull_url)

    def worker_port(self, rank: int) -> Optional[int]:
        return port_for("lmcache_worker_ports", self.lmcache_worker_ports, rank)

    def check_command_port(self, rank: int) -> None:
        """A worker that reports needs a command port, or the controller could not reach it.
        Raises ConfigError naming the key."""
        if self.enable_controller and self.worker_port(rank) is None:
            raise ConfigError("enable_controller is on but lmcache_worker_ports is not set: the controller sends "
                              "its commands (/clear, /move, ...) to that port (LMCache's lmcache_worker_port "
                              "works too)")

    def p2p_port(self, rank: int) -> Optional[int]:
        return port_for("p2p_init_ports", self.p2p_init_ports, rank)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unknown_keys"}

    def validate(self) -> "LMCacheConfig":
        """Check every value; raises ConfigError naming the first bad key and value."""
        _positive_int("chunk_size", self.chunk_size)
        if not 1 <= self.world_size <= MAX_WORLD_SIZE:
            raise _bad("world_size", self.world_size, f"must be in 1..{MAX_WORLD_SIZE}")
        _non_negative("max_local_cpu_size", self.max_local_cpu_size)
        _non_negative("max_local_disk_size", self.max_local_disk_size)
        _positive("heartbeat_interval", self.heartbeat_interval)
        _positive("heartbeat_timeout", self.heartbeat_timeout)
        _positive("report_interval", self.report_interval)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_timeout ({self.heartbeat_timeout!r}) must be larger than "
                f"heartbeat_interval ({self.heartbeat_interval!r})"
            )
        if not (0 <= self.hash_seed < 2**64):
            raise ConfigError(f"hash_seed must be in [0, 2**64), got {self.hash_seed!r}")
        _positive_int("max_frame_bytes", self.max_frame_bytes)
        if self.max_frame_bytes < 4096:
            raise ConfigError(f"max_frame_bytes must be at least 4096, got {self.max_frame_bytes!r}")
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            _positive_int(key, getattr(self, key))
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if not self.lmcache_instance_id or self.lmcache_instance_id in RESERVED_INSTANCE_IDS:
            raise ConfigError(
                f"lmcache_instance_id must be a non-empty name other than {'/'.join(sorted(RESERVED_INSTANCE_IDS))}, "
                f"got {self.lmcache_instance_id!r}"
            )
        if self.enable_controller:
            self.controller_address()
        if self.controller_lookup_url is not None:
            url = self.controller_lookup_url.strip()
            if "://" in url and not url.startswith("http://"):
                raise ConfigError(f"controller_lookup_url must be http://host:port, got {self.controller_lookup_url!r}")
            _parse_hostport("controller_lookup_url", url)
        for key in ("lmcache_worker_ports", "p2p_init_ports"):
            _check_ports(key, getattr(self, key))
        if self.local_disk is not None and not self.disk_path:
            raise ConfigError(f"local_disk must name a directory, got {self.local_disk!r}")
        if not self.local_cpu and not self.disk_enabled:
            raise ConfigError(
                "local_cpu is False but no disk tier is configured (local_disk and "
                "max_local_disk_size > 0): nothing would hold the KV cache"
            )
        if self.local_cpu and self.max_local_cpu_size <= 0:
            raise ConfigError(f"max_local_cpu_size must be > 0 when local_cpu is on, got {self.max_local_cpu_size!r}")
        # The pool must hold at least one full chunk.
        if self.max_local_cpu_size * GB < self.kv_bytes_per_token() * self.chunk_size:
            raise ConfigError(
                f"max_local_cpu_size ({self.max_local_cpu_size!r} GB) is smaller than one chunk "
                f"({self.kv_bytes_per_token() * self.chunk_size} bytes)"
            )
        return self


# -- value parsing ------------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _kinds() -> dict[str, str]:
    """Key -> the kind of value it takes."""
    kinds = {}
    for f in dataclasses.fields(LMCacheConfig):
        if f.name == "unknown_keys":
            continue
        if f.name in ("lmcache_worker_ports", "p2p_init_ports"):
            kinds[f.name] = "ports"
        elif f.name in ("controller_pull_url", "controller_lookup_url", "p2p_host", "local_disk", "controller_api_key"):
            kinds[f.name] = "optstr"
        else:
            kinds[f.name] = {bool: "bool", int: "int", float: "float", str: "str"}[type(f.default)]
    return kinds


KINDS = _kinds()
# LMCache's own aliases of keys (its config.py): the old names keep working.
ALIASES = {"lmcache_worker_port": "lmcache_worker_ports", "controller_url": "controller_pull_url"}


def _known_key(key: str, values: dict[str, Any], source: str, unknown: list[str], shown: str = "") -> Optional[str]:
    """The config key ``key`` names (an LMCache alias resolved), or None after warning about an
    unknown one with the closest known key."""
    if key in KINDS:
        if key in values:  # a mapping's keys are unique: the earlier one was an alias
            raise ConfigError(f"{source}: {key!r} is given twice (once by its old name)")
        return key
    if key in ALIASES:
        target = ALIASES[key]
        if target in values:
            raise ConfigError(f"{source}: {key!r} and {target!r} both given; they are the same key")
        return target
    close = difflib.get_close_matches(key, list(KINDS) + list(ALIASES), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    log.warning("ignoring unknown config key %r in %s%s", shown or key, source, hint)
    unknown.append(shown or key)
    return None


def _bad(key: str, value: Any, what: str) -> ConfigError:
    return ConfigError(f"bad value for {key}: {value!r} ({what})")


def parse_value(key: str, value: Any, from_env: bool = False) -> Any:
    """Convert ``value`` (from YAML, or a string from the environment) to ``key``'s type."""
    kind = KINDS[key]
    if from_env and isinstance(value, str):
        text = value.strip()
        if kind in ("optstr", "ports") and text.lower() in ("", "none", "null"):
            return None
        if kind == "ports":
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise _bad(key, value, "expected a port or a list of ports") from None
            elif "," in text:
                value = [part.strip() for part in text.split(",")]
            else:
                value = text
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if type(value) is int and value in (0, 1):
            return bool(value)
        raise _bad(key, value, "expected true or false")
    if kind == "int":
        return _to_int(key, value)
    if kind == "float":
        if isinstance(value, bool):
            raise _bad(key, value, "expected a number")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise _bad(key, value, "expected a number") from None
        if not math.isfinite(result):
            raise _bad(key, value, "expected a finite number")
        return result
    if kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _bad(key, value, "expected a string")
    if kind == "optstr":
        if value is None or isinstance(value, str):
            return value
        raise _bad(key, value, "expected a string")
    if kind == "ports":
        if value is None:
            return None
        if isinstance(value, list):
            if not value:
                raise _bad(key, value, "expected a port or a non-empty list of ports")
            return [_to_int(key, v) for v in value]
        return _to_int(key, value)
    raise AssertionError(kind)


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _bad(key, value, "expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip(), 0)
        except ValueError:
            pass
    raise _bad(key, value, "expected an integer")


def _positive_int(key: str, value: int) -> None:
    if value <= 0:
        raise _bad(key, value, "must be > 0")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise _bad(key, value, "must be > 0")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise _bad(key, value, "must be >= 0")


def _check_ports(key: str, ports: Optional[Ports]) -> None:
    if ports is None:
        return
    for port in ports if isinstance(ports, list) else [ports]:
        if not 0 <= port <= 65535:
            raise _bad(key, ports, "ports must be in 0..65535")


def port_for(key: str, ports: Optional[Ports], rank: int) -> Optional[int]:
    """The port of tensor-parallel ``rank``; 0 means any free port. None when unset."""
    if ports is None:
        return None
    if isinstance(ports, list):
        if rank >= len(ports):
            raise ConfigError(f"{key} lists {len(ports)} port(s), no port for worker rank {rank}: {ports!r}")
        return ports[rank]
    if ports == 0:
        return 0
    if ports + rank > 65535:
        raise _bad(key, ports, f"base port + rank {rank} exceeds 65535")
    return ports + rank


def _parse_hostport(key: str, value: Optional[str]) -> tuple[str, int]:
    if not value:
        raise ConfigError(f"{key} must be set as host:port, got {value!r}")
    text = value.strip()
    for scheme in ("tcp://", "http://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not host or not 0 < number <= 65535:
        raise ConfigError(f"bad value for {key}: {value!r} (expected host:port)")
    return host, number


# -- loading ------------------------------------------------------------------------------
def load_config(path: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> LMCacheConfig:
    """Defaults, then the YAML file (``path`` or $LMCACHE_CONFIG_FILE), then LMCACHE_* overrides.

    Raises ConfigError on an unreadable file or a bad value; unknown keys are warned about.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    unknown: list[str] = []
    path = path or env.get(CONFIG_FILE_ENV) or None
    if path:
        values.update(_read_file(path, unknown))
    from_env: dict[str, Any] = {}  # the environment's values (a key and its alias both set is an error)
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in _KNOWN_ENV:
            continue
        known = _known_key(name[len(ENV_PREFIX) :].lower(), from_env, "the environment", unknown, shown=name)
        if known is not None:
            from_env[known] = parse_value(known, raw, from_env=True)
    values.update(from_env)
    if API_KEY_ENV in env and "LMCACHE_CONTROLLER_API_KEY" not in env:
        values["controller_api_key"] = env[API_KEY_ENV] or None
    config = LMCacheConfig(**values)
    config.unknown_keys = unknown
    return config.validate()


def config_from_dict(data: Mapping[str, Any]) -> LMCacheConfig:
    """Build and validate a config from a mapping (YAML-like values); unknown keys warned."""
    unknown: list[str] = []
    values = _from_mapping(data, "dict", unknown)
    config = LMCacheConfig(**values)
    config.unknown_keys = unknown
    return config.validate()


def read_file_values(path: str) -> dict[str, Any]:
    """The keys of a config file, parsed (not yet checked together). Raises ConfigError."""
    return _read_file(path, [])


def _read_file(path: str, unknown: list[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return _from_mapping(data, path, unknown)


def _from_mapping(data: Mapping[str, Any], source: str, unknown: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in data.items():
        known = _known_key(key, values, source, unknown) if isinstance(key, str) else None
        if known is None:
            if not isinstance(key, str):
                log.warning("ignoring config key %r in %s: keys are strings", key, source)
                unknown.append(str(key))
            continue
        values[known] = parse_value(known, raw)
    return values
