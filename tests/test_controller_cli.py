"""lmcache_controller's command line: every flag says what it is, in which unit, and its default;
--version names the build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import lmcache_rs
from lmcache_rs.controller.settings import Settings, build_parser


def options():
    return [a for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "version")]


def test_every_flag_has_help_with_its_unit_and_default():
    for action in options():
        flag, text = action.option_strings[0], action.help or ""
        assert "default" in text, f"{flag}: no default in its help: {text!r}"
        if action.type is float or any(w in action.dest for w in ("timeout", "interval")):
            assert "seconds" in text, f"{flag}: no unit in its help: {text!r}"
        if action.dest.endswith("_bytes"):
            assert "bytes" in text, f"{flag}: no unit in its help: {text!r}"


def test_help_and_version():
    run = [sys.executable, "-m", "lmcache_rs.controller"]
    out = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--max-body-bytes" in out.stdout and "--version" in out.stdout
    out = subprocess.run(run + ["--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.startswith(f"lmcache_controller {lmcache_rs.__version__} "), out.stdout
    assert f"Python {sys.version.split()[0]}" in out.stdout


def test_lmcache_controller_config_file_and_variables(tmp_path, monkeypatch):
    """An LMCache user's controller config works unchanged: the file named by
    $LMCACHE_CONTROLLER_CONFIG_FILE and LMCache's $LMCACHE_CONTROLLER_<KEY> variables, under
    our flags."""
    from lmcache_rs.controller.settings import settings_from_args

    for name in [n for n in os.environ if n.startswith("LMCACHE_CONTROLLER_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "controller.yaml"
    path.write_text('controller_monitor_ports: {"pull": 18300, "reply": 18400, "heartbeat": 18082}\n'
                    "controller_port: 19000\nlmcache_worker_timeout: 60\nhealth_check_interval: 5\n"
                    "extra_config: {anything: 1}\n")
    monkeypatch.setenv("LMCACHE_CONTROLLER_CONFIG_FILE", str(path))
    s = settings_from_args([])
    assert s.monitor_ports == {"pull": 18300, "reply": 18400, "heartbeat": 18082}
    assert (s.port, s.lmcache_worker_timeout, s.lmcache_probe_interval) == (19000, 60.0, 5.0)
    assert s.host == "127.0.0.1"  # not in the file: ours, not LMCache's 0.0.0.0
    # LMCache's variables over its file, our flags over both
    monkeypatch.setenv("LMCACHE_CONTROLLER_CONTROLLER_PORT", "19100")
    monkeypatch.setenv("LMCACHE_CONTROLLER_CONTROLLER_MONITOR_PORTS", '{"pull": 18301}')
    monkeypatch.setenv("LMCACHE_CONTROLLER_HEALTH_CHECK_INTERVAL", "-1")  # off in LMCache: our probes stay on
    s = settings_from_args([])
    assert (s.port, s.monitor_ports, s.lmcache_probe_interval) == (19100, {"pull": 18301},
                                                                   Settings().lmcache_probe_interval)
    s = settings_from_args(["--port", "19200", "--monitor-ports", '{"pull": 18302}', "--lmcache-worker-timeout", "7"])
    assert (s.port, s.monitor_ports, s.lmcache_worker_timeout) == (19200, {"pull": 18302}, 7.0)
    monkeypatch.setenv("LMCACHE_CONTROLLER_MONITOR_PORTS", '{"pull": 18303}')  # ours over LMCache's
    assert settings_from_args([]).monitor_ports == {"pull": 18303}
    monkeypatch.delenv("LMCACHE_CONTROLLER_MONITOR_PORTS")
    monkeypatch.setenv("LMCACHE_CONTROLLER_CONTROLLER_MONITOR_PORTS", "none")  # as the flag's "none"
    assert settings_from_args([]).monitor_ports is None
    monkeypatch.setenv("LMCACHE_CONTROLLER_MONITOR_PORTS", '{"pull": 18303}')
    # bad values name the key; a key a flag sets is not read; an empty variable is unset
    monkeypatch.setenv("LMCACHE_CONTROLLER_CONTROLLER_PORT", "nine")
    with pytest.raises(ValueError, match="controller_port"):
        settings_from_args([])
    assert settings_from_args(["--port", "19300"]).port == 19300
    monkeypatch.setenv("LMCACHE_CONTROLLER_CONTROLLER_PORT", "")
    assert settings_from_args([]).port == 19000  # the file's
    monkeypatch.delenv("LMCACHE_CONTROLLER_CONTROLLER_PORT")
    monkeypatch.delenv("LMCACHE_CONTROLLER_CONTROLLER_MONITOR_PORTS")  # else it stands for the file's
    path.write_text('controller_monitor_ports: {"pul": 1}\n')
    with pytest.raises(ValueError, match="unknown socket 'pul'"):
        settings_from_args([])
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="not a mapping"):
        settings_from_args([])


def test_worker_python_from_the_environment(monkeypatch):
    from lmcache_rs import python_str_hash
    from lmcache_rs.controller.settings import settings_from_args

    monkeypatch.setenv("PYTHONHASHSEED", "123")
    monkeypatch.setenv("LMCACHE_CONTROLLER_MONITOR_PORTS", '{"pull": 8300}')  # (the tests' default is none)
    monkeypatch.delenv("LMCACHE_CONTROLLER_WORKER_PYTHON", raising=False)
    assert settings_from_args([]).none_hash == python_str_hash("123", 123, "siphash13")
    monkeypatch.setenv("LMCACHE_CONTROLLER_WORKER_PYTHON", "3.10")
    assert settings_from_args([]).none_hash == python_str_hash("123", 123, "siphash24")
    assert settings_from_args(["--worker-python", "3.11+"]).none_hash == python_str_hash("123", 123, "siphash13")
    monkeypatch.setenv("LMCACHE_CONTROLLER_WORKER_PYTHON", "3.9")
    with pytest.raises(ValueError, match="worker_python"):
        settings_from_args([])
