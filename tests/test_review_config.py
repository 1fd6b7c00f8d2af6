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


@pytest.mark.parametrize("text", [
    "chunk_size: '256'\n", "chunk_size: true\n", "chunk_size: 64\nhash_seed: 7\n", "hash_seed: 1.5\n",
    "hash_seed: null\n", "controller_api_key: 12\n", "controller_api_key: k\nmax_frame_bytes: 8192\n",
    "- 1\n- 2\n", "", "chunk_size: [1\n", "other: 1\nchunk_size: 0x40\n",
])
def test_controller_reads_the_config_file_as_the_workers_do(tmp_path, text):
    # the same file: the controller takes the shared keys with the workers' values, or both refuse
    path = tmp_path / "c.yaml"
    path.write_text(text)
    try:
        worker = load_config(str(path), env={})
    except ConfigError as exc:
        with pytest.raises(ValueError):
            read_yaml(str(path))
        assert str(exc)  # the worker's refusal names the problem
        return
    values = read_yaml(str(path))
    assert values == {k: getattr(worker, k) for k in values}
    assert all(k in values for k in ("chunk_size", "hash_seed") if k in text)
