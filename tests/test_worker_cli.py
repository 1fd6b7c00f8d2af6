"""lmcache_worker's command line: bad arguments and bad configs exit 2 with one message naming
the problem, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = [
    (["--worker-id", "2"], {"LMCACHE_WORLD_SIZE": "2"}, "--worker-id must be a rank of world_size 2 (0..1), got 2"),
    (["--worker-id", "-1"], {}, "--worker-id must be a rank of world_size 1 (0..0), got -1"),
    ([], {"LMCACHE_WORLD_SIZE": "0"}, "world_size"),
    (["--log-level", "LOUD"], {}, "invalid choice: 'LOUD'"),
    ([], {"LMCACHE_LOG_LEVEL": "chatty"}, "LMCACHE_LOG_LEVEL must be one of"),
    (["--worker-id", "1"], {"LMCACHE_LMCACHE_WORKER_PORTS": "65535", "LMCACHE_WORLD_SIZE": "2"}, "lmcache_worker_ports"),
    (["--worker-id", "2"], {"LMCACHE_LMCACHE_WORKER_PORTS": "20091,20092", "LMCACHE_WORLD_SIZE": "3"},
     "no port for worker rank 2"),
    (["--worker-id", "1"], {"LMCACHE_P2P_INIT_PORTS": "65535", "LMCACHE_WORLD_SIZE": "2"}, "p2p_init_ports"),
    ([], {}, "the worker would do nothing (--standalone runs it anyway)"),
    ([], {"LMCACHE_ENABLE_CONTROLLER": "true", "LMCACHE_CONTROLLER_PULL_URL": "127.0.0.1:9"},
     "enable_controller is on but lmcache_worker_ports is not set"),
]


@pytest.mark.parametrize("args,env,message", CASES, ids=[c[2][:30] for c in CASES])
def test_bad_arguments_exit_2_with_a_message(args, env, message, tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    r = subprocess.run([sys.executable, "-m", "lmcache_rs.worker", *args], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env={**clean, "LMCACHE_ENABLE_CONTROLLER": "false", **env})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_help_and_version_answer_without_importing_torch():
    code = ("import sys, lmcache_rs.worker.__main__ as m\n"
            "try:\n    m.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--standalone" in r.stdout, r.stderr
    # every flag's help gives its default
    for flag in ("--config", "--worker-id", "--preload", "--standalone", "--log-level"):
        text = r.stdout.split("options:", 1)[1].split(f"\n  {flag}", 1)[1].split("\n  --", 1)[0]
        assert "default" in text, (flag, text)
    r = subprocess.run([sys.executable, "-m", "lmcache_rs.worker", "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("lmcache_worker (lmcache_rs) "), r.stderr


@pytest.mark.parametrize("env, says", [
    ({}, " reports_to=none worker_port="),
    # a misspelt enable_controller (warned about) leaves the URL unused: the ready line says so
    ({"LMCACHE_CONTROLLER_PULL_URL": "127.0.0.1:9"},
     " reports_to=none (controller_pull_url is set but enable_controller is off) worker_port="),
])
def test_ready_line_says_where_it_reports(tmp_path, env, says):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
    proc = subprocess.Popen([sys.executable, "-m", "lmcache_rs.worker", "--standalone"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=tmp_path,
                            env={**clean, "LMCACHE_ENABLE_CONTROLLER": "false", "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.01",
                                 **env})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("lmcache_worker ready:") and says in line, line
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
