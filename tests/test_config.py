"""config.py: the spec's example.yaml, LMCACHE_* overrides, unknown keys and bad values."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from lmcache_rs.config import GB, ConfigError, LMCacheConfig, config_from_dict, load_config, port_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "configs", "example.yaml")


def test_example_yaml_keeps_its_meaning():
    config = load_config(EXAMPLE, env={})
    assert config.chunk_size == 256
    assert config.local_cpu is True
    assert config.max_local_cpu_size == 5.0
    assert config.enable_controller is True
    assert config.lmcache_instance_id == "lmcache_default_instance"
    assert config.controller_address() == ("localhost", 9001)
    assert config.worker_port(0) == 8001 and config.worker_port(1) == 8002
    assert config.p2p_host == "localhost"
    assert config.p2p_port(0) == 8200 and config.p2p_port(3) == 8203
    assert config.hash_seed == 0 and not config.disk_enabled


def test_config_file_from_environment():
    config = load_config(env={"LMCACHE_CONFIG_FILE": EXAMPLE})
    assert config.enable_controller is True


def test_environment_overrides_single_keys_with_types():
    env = {
        "LMCACHE_CONFIG_FILE": EXAMPLE,
        "LMCACHE_CHUNK_SIZE": "512",
        "LMCACHE_LOCAL_CPU": "false",
        "LMCACHE_LOCAL_DISK": "file:///tmp/lmc-disk/",
        "LMCACHE_MAX_LOCAL_DISK_SIZE": "1.5",
        "LMCACHE_P2P_INIT_PORTS": "9100, 9200",
        "LMCACHE_HEARTBEAT_INTERVAL": "0.25",
        "LMCACHE_KV_DTYPE": "bfloat16",
        "LMCACHE_HASH_SEED": "7",
    }
    config = load_config(env=env)
    assert config.chunk_size == 512 and config.local_cpu is False
    assert config.disk_path == "/tmp/lmc-disk/" and config.max_local_disk_size == 1.5
    assert config.p2p_init_ports == [9100, 9200] and config.p2p_port(1) == 9200
    assert config.heartbeat_interval == 0.25 and config.kv_dtype == "bfloat16" and config.hash_seed == 7
    assert config.lmcache_instance_id == "lmcache_default_instance"  # from the file


def test_env_list_syntax_and_none():
    config = load_config(env={"LMCACHE_LMCACHE_WORKER_PORTS": "[8001, 8005]", "LMCACHE_P2P_HOST": "none"})
    assert config.lmcache_worker_ports == [8001, 8005] and config.p2p_host is None
    with pytest.raises(ConfigError, match="no port for worker rank 2"):
        config.worker_port(2)


@pytest.mark.parametrize(
    "key,value",
    [
        ("LMCACHE_CHUNK_SIZE", "abc"),
        ("LMCACHE_CHUNK_SIZE", "0"),
        ("LMCACHE_LOCAL_CPU", "maybe"),
        ("LMCACHE_MAX_LOCAL_CPU_SIZE", "-1"),
        ("LMCACHE_MAX_LOCAL_CPU_SIZE", "nan"),
        ("LMCACHE_P2P_INIT_PORTS", "70000"),
        ("LMCACHE_KV_DTYPE", "int8"),
        ("LMCACHE_HEARTBEAT_TIMEOUT", "0.5"),
    ],
)
def test_bad_environment_value_names_key_and_value(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(env={"LMCACHE_CONFIG_FILE": EXAMPLE, key: value})
    message = str(info.value)
    assert key[len("LMCACHE_"):].lower() in message


def test_bad_file_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("chunk_size: many\n")
    with pytest.raises(ConfigError, match="chunk_size: 'many'"):
        load_config(str(path), env={})
    path.write_text("enable_controller: true\ncontroller_pull_url: nowhere\n")
    with pytest.raises(ConfigError, match="controller_pull_url: 'nowhere'"):
        load_config(str(path), env={})
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path), env={})
    path.write_text("chunk_size: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"), env={})
    for name in ("layout_info", "event_id", "detail"):
        path.write_text(f"lmcache_instance_id: {name}\n")
        with pytest.raises(ConfigError, match="lmcache_instance_id must be"):
            load_config(str(path), env={})
    path.write_text("local_cpu: false\n")
    with pytest.raises(ConfigError, match="nothing would hold"):
        load_config(str(path), env={})


def test_unknown_keys_are_warned_about(tmp_path, caplog):
    path = tmp_path / "extra.yaml"
    path.write_text("chunk_size: 128\nremote_url: lm://x:1\n")
    with caplog.at_level(logging.WARNING, logger="lmcache_rs.config"):
        config = load_config(str(path), env={"LMCACHE_NO_SUCH_KEY": "1"})
    assert config.chunk_size == 128
    assert config.unknown_keys == ["remote_url", "LMCACHE_NO_SUCH_KEY"]
    assert "remote_url" in caplog.text and "LMCACHE_NO_SUCH_KEY" in caplog.text


def test_defaults_are_tiny_and_fit_millions_of_tokens():
    config = LMCacheConfig().validate()
    tokens = int(config.max_local_cpu_size * GB) // config.kv_bytes_per_token()
    assert tokens >= 5_000_000
    assert config.hash_seed == 0 and config.max_frame_bytes == 64 * 1024 * 1024


def test_ports():
    assert port_for("p", None, 3) is None
    assert port_for("p", 0, 5) == 0  # any free port, every rank
    assert port_for("p", [1, 2], 1) == 2
    with pytest.raises(ConfigError):
        port_for("p", 65535, 1)
    with pytest.raises(ConfigError, match="ports"):
        config_from_dict({"lmcache_worker_ports": [8001, "x"]})


def test_config_module_does_not_import_torch():
    code = "import sys, lmcache_rs.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_api_key_from_the_controllers_variable():
    assert load_config(env={"LMCACHE_API_KEY": "k1"}).controller_api_key == "k1"
    both = {"LMCACHE_API_KEY": "k1", "LMCACHE_CONTROLLER_API_KEY": "k2"}
    assert load_config(env=both).controller_api_key == "k2"
    assert load_config(env={"LMCACHE_API_KEY": ""}).controller_api_key is None



@pytest.mark.parametrize("env", [
    {"LMCACHE_API_KEY": ""},
    {"LMCACHE_API_KEY": "k"},
    {"LMCACHE_CONTROLLER_API_KEY": "c", "LMCACHE_API_KEY": "k"},
    {"LMCACHE_CONTROLLER_API_KEY": "", "LMCACHE_API_KEY": "k"},
    {"LMCACHE_CHUNK_SIZE": "128", "LMCACHE_HASH_SEED": "7", "LMCACHE_MAX_FRAME_BYTES": "8192"},
    {},
])
def test_controller_reads_the_shared_keys_as_a_worker_does(tmp_path, env, monkeypatch):
    from lmcache_rs.controller.settings import settings_from_args

    path = tmp_path / "c.yaml"
    path.write_text("controller_api_key: secret\nchunk_size: 64\n")
    worker = load_config(str(path), env=env)
    for name in [k for k in os.environ if k.startswith("LMCACHE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    controller = settings_from_args(["--config", str(path)])
    assert (controller.api_key, controller.chunk_size, controller.hash_seed, controller.max_frame_bytes) == (
        worker.controller_api_key, worker.chunk_size, worker.hash_seed, worker.max_frame_bytes)


def test_lmcache_aliases_and_misspelt_keys(caplog):
    from lmcache_rs.config import ConfigError, config_from_dict

    config = config_from_dict({"lmcache_worker_port": 8001, "controller_url": "localhost:9001", "enable_controler": 1})
    assert (config.lmcache_worker_ports, config.controller_pull_url) == (8001, "localhost:9001")
    assert config.unknown_keys == ["enable_controler"]
    assert "did you mean 'enable_controller'?" in caplog.text
    for both in ({"lmcache_worker_port": 1, "lmcache_worker_ports": 2}, {"controller_pull_url": "a:1", "controller_url": "b:2"}):
        with pytest.raises(ConfigError, match="twice|both"):
            config_from_dict(both)
