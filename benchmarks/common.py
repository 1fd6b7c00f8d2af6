"""Small helpers shared by the benchmark scripts (standard library only)."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
OUR_PY = ROOT / ".venv" / "bin" / "python"
ANCHOR_PY = ROOT / ".bench-venv" / "bin" / "python"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the benchmarks stay on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its waited-for children: the process's own
    code, and the kernel's work for it (system calls, the TCP stack, page faults)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + cutime) / ticks, (stime + cstime) / ticks


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its waited-for children) in seconds."""
    return sum(cpu_times(pid))


def stop(proc: subprocess.Popen | None, what: str) -> None:
    """SIGINT (a graceful stop), then SIGTERM, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log(f"{what} ignored SIGINT for 10s; terminating it")
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log(msg: str) -> None:
    """Progress goes to stderr so stdout stays a clean report."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def loadavg() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return (round(a, 2), round(b, 2), round(c, 2))


def cpu_busy(sample_s: float = 1.0) -> float:
    """Fraction of all CPU time that was busy (any process) over ``sample_s`` seconds."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    t0, i0 = snap()
    time.sleep(sample_s)
    t1, i1 = snap()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(max_wait_s: float, threshold: float = 0.2) -> dict[str, float]:
    """Wait (up to max_wait_s) until the machine is nearly idle: the 2 cores are shared with
    other work, and a benchmark started under someone's compile measures the compile.
    Returns what was seen, for the record."""
    t0 = time.time()
    busy = cpu_busy()
    announced = False
    while busy > threshold and time.time() - t0 < max_wait_s:
        if not announced:
            log(f"machine busy ({busy * 100:.0f}% of CPU in use by other work); waiting up to {max_wait_s:.0f}s for it to settle")
            announced = True
        busy = cpu_busy(2.0)
    return {"cpu_busy_before": round(busy, 3), "waited_s": round(time.time() - t0, 1)}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def latency_summary(ns: list[int]) -> dict[str, float]:
    """p50 / p99 / mean in microseconds from per-call nanoseconds."""
    s = sorted(ns)
    return {
        "n": len(s),
        "p50_us": percentile(s, 50) / 1e3,
        "p99_us": percentile(s, 99) / 1e3,
        "mean_us": sum(s) / len(s) / 1e3,
    }


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
        **memory_facts(),
    }


# CPU features that change how fast hashing and table probes run
_CPU_FLAGS = ("sse4_2", "avx2", "bmi2", "avx512f", "avx512bw", "sha_ni")


def _selected(path: str) -> str:
    """The bracketed choice of a sysfs setting such as 'always [madvise] never'."""
    try:
        text = Path(path).read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else text.strip()


def memory_facts() -> dict[str, object]:
    """The host facts that decide a memory-latency-bound benchmark: transparent huge pages,
    the page size, and the CPU's vector and hashing features."""
    flags: set[str] = set()
    vendor = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu_vendor": vendor,
        "cpu_flags": [f for f in _CPU_FLAGS if f in flags],
        "page_size": os.sysconf("SC_PAGE_SIZE"),
        "thp_enabled": _selected("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_defrag": _selected("/sys/kernel/mm/transparent_hugepage/defrag"),
    }


PR_SET_THP_DISABLE = 41


def set_thp(mode: str) -> None:
    """``off``: no transparent huge pages for this process, whatever the host's setting
    (prctl PR_SET_THP_DISABLE, inherited by children), to measure as a host without them;
    ``system``: leave the host's setting."""
    if mode == "off":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE) failed")
    elif mode != "system":
        raise ValueError(f"unknown THP mode {mode!r}")


def anon_huge_mib() -> float:
    """MiB of this process's anonymous memory backed by transparent huge pages now."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_side(python: Path, script: Path, args: list[str], env: dict[str, str] | None = None,
             timeout: float = 600) -> dict:
    """Run one side of a benchmark in its own interpreter; it writes its JSON result to the
    path given by --out. Its progress (stderr) streams through."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{script.stem}-{args[args.index('--side') + 1]}.json"
    if out.exists():
        out.unlink()
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    cmd = [str(python), str(script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, env=full_env, timeout=timeout, cwd=str(ROOT))
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    return json.loads(out.read_text())


def write_json(path: str | Path, data: object) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fmt(x: float, digits: int = 1) -> str:
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.{max(digits, 2)}f} M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.{digits}f} k"
    return f"{x:.{digits}f}"


def publish(res: dict, name: str, text: str, out_arg: str | None) -> Path:
    """Keep the report in the results, write the JSON, print the table and where it went."""
    res["report"] = text
    out = Path(out_arg) if out_arg else RESULTS_DIR / f"{name}.json"
    write_json(out, res)
    print(f"\n## {name}\n")
    print(text)
    shown = out.relative_to(Path.cwd()) if out.resolve().is_relative_to(Path.cwd()) else out
    print(f"\n(full results: {shown})")
    return out
