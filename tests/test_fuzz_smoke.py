"""Fuzzing, the short version the test suite runs (``make fuzz`` runs 1,000,000 inputs per target).

* the checked-in corpus (fuzz/corpus/) replayed through every target;
* a coverage-guided atheris run of a few thousand inputs per target (skipped without atheris);
* hypothesis strategies of structured-but-wrong messages: msgpack maps of every monitor message
  type with wrong, missing and extra fields; JSON bodies of every HTTP endpoint with wrong
  types; /lookup bodies of any JSON. Each goes through the same target code and checks as the
  fuzzer's inputs: nothing crashes, nothing answers 500 or ``internal_error``, and every refused
  input leaves the index exactly as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzz_frames  # noqa: E402
import fuzz_http  # noqa: E402
import fuzz_kv_events  # noqa: E402
import fuzz_lookup_json  # noqa: E402
import fuzz_monitor  # noqa: E402
import harness  # noqa: E402

TARGETS = {"http": fuzz_http, "lookup_json": fuzz_lookup_json, "monitor": fuzz_monitor, "frames": fuzz_frames,
           "kv_events": fuzz_kv_events}
SMOKE_RUNS = 4000


@pytest.fixture(autouse=True)
def _controller_logs():
    # The targets silence the controller's per-input warnings; give the logger back afterwards.
    import logging

    logger = logging.getLogger("lmcache_rs")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.parametrize("name", list(TARGETS))
def test_checked_in_corpus_replays_clean(name):
    files = sorted((FUZZ / "corpus" / name).glob("*"))
    assert len(files) >= 8, f"fuzz/corpus/{name} is missing"
    for path in files:
        TARGETS[name].test_one_input(path.read_bytes())


def _smoke(targets: list[str], timeout: float) -> None:
    proc = subprocess.run([sys.executable, str(FUZZ / "run.py"), "--runs", str(SMOKE_RUNS), "--seed", "1", *targets],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    summary = json.loads((ROOT / "target" / "fuzz" / "summary.json").read_text())
    assert {r["target"] for r in summary} == set(targets)
    for r in summary:
        assert r["inputs"] >= SMOKE_RUNS and not r["crash_files"], r


def test_atheris_smoke_run():
    pytest.importorskip("atheris")
    _smoke(list(TARGETS), 240)


def test_cargo_fuzz_smoke_run():
    """The index's parsers under cargo fuzz, where cargo-fuzz and a nightly toolchain are installed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_run", FUZZ / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    if not run.cargo_fuzz_available():
        pytest.skip("cargo fuzz (and a nightly toolchain) not installed")
    _smoke(run.RUST_TARGETS, 600)


# -- hypothesis: structured-but-wrong messages ------------------------------------------------
wrong = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(),
    st.text(max_size=12), st.binary(max_size=20), st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-5, 5), max_size=2),
)
locations = st.sampled_from(fuzz_monitor.LOCS)
key_bins = st.lists(st.sampled_from(fuzz_monitor.KEYS), max_size=6).map(fuzz_monitor.pack_u64s)
VALID = {
    "hello": {k: st.just(v) for k, v in fuzz_monitor.hello().items() if k != "t"},
    "heartbeat": {"seq": st.integers(0, 6)},
    "sync_start": {"seq": st.integers(0, 6)},
    "sync_chunk": {"location": locations, "hashes": key_bins},
    "sync_end": {"count": st.integers(0, 12)},
    "events": {"seq": st.integers(0, 6),
               "ops": st.lists(st.tuples(st.sampled_from(["admit", "evict"]), locations, key_bins).map(list),
                               max_size=3)},
    "ping": {"id": st.integers(0, 99)},
    "bye": {},
}


@st.composite
def monitor_message(draw):
    kind = draw(st.sampled_from(list(VALID) + ["welcome", "resync", "pong", "nope", ""]))
    m = {"t": kind}
    for name, good in VALID.get(kind, {}).items():
        how = draw(st.integers(0, 5))
        if how == 0:
            continue  # missing
        m[name] = draw(wrong) if how == 1 else draw(good)
    if kind == "events" and isinstance(m.get("ops"), list) and draw(st.booleans()):
        m["ops"] = m["ops"] + [draw(st.one_of(wrong, st.lists(wrong, min_size=3, max_size=3)))]
    if draw(st.integers(0, 6)) == 0:
        m[draw(st.text(max_size=6))] = draw(wrong)
    if draw(st.integers(0, 15)) == 0:
        m["t"] = draw(wrong)
    return m


def _frame(m: dict) -> bytes:
    body = msgpack.packb(m, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(monitor_message(), min_size=1, max_size=8), prelude=st.booleans(),
       keyed=st.booleans(), drop=st.booleans(), keys=st.integers(0, 20))
def test_wrong_monitor_messages_change_nothing(messages, prelude, keyed, drop, keys):
    flags = (1 if prelude else 0) | (4 if keyed else 0) | (8 if drop else 0)
    head = bytes([flags]) + (bytes([keys, 1]) if prelude else b"")
    fuzz_monitor.test_one_input(head + b"".join(_frame(m) for m in messages))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
HTTP_FIELDS = {
    "/lookup": ["tokens"], "/clear": ["instance_id", "location"], "/pin": ["instance_id", "location", "tokens"],
    "/unpin": ["instance_id", "location", "tokens"], "/compress": ["instance_id", "location", "tokens", "method"],
    "/decompress": ["instance_id", "location", "tokens", "method"],
    "/move": ["old_position", "new_position", "tokens", "copy"], "/health": ["instance_id"],
    "/check_finish": ["event_id"], "/query_worker_info": ["instance_id", "worker_ids"],
    "/query_instance": ["ip", "event_id"],
}
GOOD = {"instance_id": st.sampled_from(["inst_a", "inst_b"]), "location": locations,
        "tokens": st.lists(st.integers(0, 2**32 - 1), max_size=12), "method": st.just("zstd"),
        "old_position": st.tuples(st.sampled_from(["inst_a", "inst_b"]), locations).map(list),
        "new_position": st.tuples(st.sampled_from(["inst_a", "inst_b"]), locations).map(list),
        "copy": st.booleans(), "event_id": st.text(max_size=8), "ip": st.just("127.0.0.1"),
        "worker_ids": st.lists(st.integers(0, 2), max_size=3)}


@st.composite
def http_request(draw):
    path = draw(st.sampled_from(list(HTTP_FIELDS)))
    body: dict = {}
    wrong_fields = 0
    for name in HTTP_FIELDS[path]:
        how = draw(st.integers(0, 3))
        if how == 0:
            continue
        if how == 1:
            body[name] = draw(json_values)
            wrong_fields += 1
        else:
            body[name] = draw(GOOD[name])
    data = json.dumps(body).encode()
    return path, (f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(http_request(), min_size=1, max_size=4), sweep=st.booleans())
def test_wrong_http_bodies_are_answered_and_change_nothing(requests, sweep):
    flags = 4 if sweep else 0
    fuzz_http.test_one_input(bytes([flags]) + b"".join(r for _, r in requests))


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(json_values, st.dictionaries(st.just("tokens"), json_values)), detail=st.booleans())
def test_any_json_lookup_body_is_answered_or_refused(body, detail):
    fuzz_lookup_json.test_one_input(bytes([2 if detail else 0]) + json.dumps(body).encode())


def test_a_finding_is_reported():
    """The harness is not vacuous: a refused frame that changes the index is caught."""
    target = fuzz_monitor.Target()

    async def one():
        c = fuzz_monitor.Conn(target.settings)
        original = c.registry.flush

        def sneaky():
            original()
            c.index.admit("sneaky", 0, harness.CPU, hashes=[1])

        c.registry.flush = sneaky  # type: ignore[method-assign]
        c.proto.data_received(_frame({"t": "events", "seq": 1, "ops": []}))  # before hello: refused

    try:
        with pytest.raises(harness.Finding, match="changed the index"):
            target.loop.run_until_complete(one())
    finally:
        target.loop.close()
