"""Error paths of config parsing: non-finite numbers, and the controller's own YAML checks."""

from __future__ import annotations

import pytest

from lmcache_rs.config import ConfigError, config_from_dict, load_config
from lmcache_rs.controller.settings import read_yaml


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf"])
def test_float_key_refuses_non_finite_values(value):
    with pytest.raises(ConfigError, match="max_local_cpu_size.*expected a finite number"):
        config_from_dict({"max_local_cpu_size": value})


@pytest.mark.parametrize("text", ["nan", "-inf", " inf "])
def test_float_key_refuses_non_finite_values_from_environment(text):
    with pytest.raises(ConfigError, match="expected a finite number"):
        load_config(env={"LMCACHE_MAX_LOCAL_CPU_SIZE": text})


@pytest.mark.parametrize(
    "line, message",
    [
        ("chunk_size: '256'", "chunk_size must be an integer"),
        ("chunk_size: true", "chunk_size must be an integer"),
        ("hash_seed: 1.5", "hash_seed must be an integer"),
        ("controller_api_key: 12", "controller_api_key must be a string"),
    ],
)
def test_controller_yaml_refuses_wrong_types(tmp_path, line, message):
    path = tmp_path / "c.yaml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_yaml(str(path))


def test_controller_yaml_refuses_a_non_mapping_and_reads_an_empty_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        read_yaml(str(path))
    path.write_text("")
    assert read_yaml(str(path)) == {}
    path.write_text("chunk_size: 64\nhash_seed: null\nother: 1\n")
    assert read_yaml(str(path)) == {"chunk_size": 64}
