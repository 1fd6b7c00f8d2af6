"""lmcache_controller's command line: every flag says what it is, in which unit, and its default;
--version names the build."""

from __future__ import annotations

import subprocess
import sys

import lmcache_rs
from lmcache_rs.controller.settings import build_parser


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
