#!/usr/bin/env python3
"""Fuzz target ``lookup_json``: /lookup bodies straight into the native ``Index.lookup_json``.

The first byte chooses raw mode (the rest is the body) or structured mode (a JSON object
built from the rest: a ``tokens`` list with edge values, extra keys, deep nesting, damage).
Checked for every input:

* the call returns bytes or raises the index's InvalidArgumentError / InvalidTypeError,
  never anything else (a panic surfaces as another exception type);
* an answer is JSON of the spec's shape: ``event_id`` as given, ``layout_info`` and the same
  pairs flat, and, whenever Python's own strict parser reads the body as an object with a
  list of u32 ``tokens``, equal to ``Index.lookup`` of those tokens; with ``detail``, the
  ``detail`` map equals ``Index.lookup_detailed``;
* a body Python reads as valid is not refused unless it has a duplicate ``tokens`` key, and a
  body Python refuses (not UTF-8 included) is not answered;
* the index is untouched (digest of stats, holders and a fixed query set).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

if __name__ == "__main__":  # under the fuzzer; imported by the tests, atheris is not needed
    import atheris

    with atheris.instrument_imports(include=["gen"]):
        import gen  # noqa: F401

from gen import Reader, json_text, nest, tokens, value  # noqa: E402
from lmcache_rs import Index, InvalidArgumentError, InvalidTypeError  # noqa: E402

EVENT_ID = "Lookup-fuzz-1"


def _no_constants(name: str):
    raise ValueError(f"JSON constant {name} is not valid JSON")


def _strict_pairs(pairs):
    # an object with "tokens" twice; only the top level's matters (the index skips nested ones)
    keys = [k for k, _ in pairs]
    return DuplicateTokens(pairs) if keys.count("tokens") > 1 else dict(pairs)


class DuplicateTokens(dict):
    pass


# Python's parser gives up on deep nesting at its recursion limit; the index skips ignored
# values without recursing. Such a body is valid JSON that Python cannot judge.
TOO_DEEP = "too deep for Python's parser"


def python_tokens(body: bytes):
    """(tokens, None) if the body is a valid /lookup body by Python's strict reading, else (None, why)."""
    try:
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_strict_pairs)
    except RecursionError:
        return None, TOO_DEEP
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(data, dict):
        return None, "not an object"
    if type(data) is DuplicateTokens:
        return None, "duplicate"
    toks = data.get("tokens")
    if not isinstance(toks, list):
        return None, "no tokens list"
    if not all(type(t) is int and 0 <= t < 2**32 for t in toks):
        return None, "bad token"
    return toks, None


class Target:
    def __init__(self) -> None:
        self.index = Index(harness.CHUNK, harness.SEED)
        harness.seed_index(self.index)
        self.baseline = harness.digest(self.index)
        self.calls = 0

    def __call__(self, data: bytes) -> None:
        r = Reader(data)
        flags = r.byte()
        if flags & 1:
            body = self.structured(r)
        else:
            body = r.rest()
        detail = bool(flags & 2)
        try:
            answer = self.index.lookup_json(body, EVENT_ID, detail)
        except (InvalidArgumentError, InvalidTypeError) as exc:
            if not str(exc):
                raise harness.Finding("a refusal without a message") from None
            toks, why = python_tokens(body)
            if toks is not None:
                raise harness.Finding(f"refused a body Python reads as valid ({exc}): {body[:200]!r}") from None
        else:
            self.check_answer(body, answer, detail)
        self.calls += 1
        if self.calls % 64 == 0 and harness.digest(self.index) != self.baseline:
            raise harness.Finding("lookup_json changed the index")

    @staticmethod
    def structured(r: Reader) -> bytes:
        how = r.below(6)
        if how == 0:
            return ('{"tokens": [1, 2], "x": ' + nest(r) + "}").encode()
        obj: dict = {}
        for _ in range(r.below(3)):
            obj[str(value(r, 2))[:12]] = value(r, 2)
        if r.below(8):
            obj["tokens"] = tokens(r) if r.below(4) else harness.PROMPTS[r.below(5)][: r.below(13)]
        text = json_text(obj, r)
        if how == 1:  # a duplicate key or whitespace and escapes the encoder never writes
            text = text.replace(b'"tokens"', r.pick([b'"tok\\u0065ns"', b' "tokens" ', b'"tokens":[],"tokens"']), 1)
        return text

    def check_answer(self, body: bytes, answer: bytes, detail: bool) -> None:
        try:
            out = json.loads(answer)
        except ValueError as exc:
            raise harness.Finding(f"answer is not JSON ({exc}): {answer[:200]!r}") from None
        if not isinstance(out, dict) or out.get("event_id") != EVENT_ID:
            raise harness.Finding(f"answer without the event id: {answer[:200]!r}")
        layout = out.get("layout_info")
        if not isinstance(layout, dict):
            raise harness.Finding(f"answer without layout_info: {answer[:200]!r}")
        flat = {k: v for k, v in out.items() if k not in ("event_id", "layout_info", "detail")}
        if flat != layout:
            raise harness.Finding(f"flat keys differ from layout_info: {answer[:300]!r}")
        toks, why = python_tokens(body)
        if toks is None:
            if why == TOO_DEEP:
                return
            raise harness.Finding(f"accepted a body Python refuses ({why}): {body[:200]!r}")
        want = {k: list(v) for k, v in self.index.lookup(toks).items()}
        if layout != want:
            raise harness.Finding(f"lookup_json {layout} != lookup {want} for {body[:200]!r}")
        if detail:
            want_detail = json.loads(json.dumps(self.index.lookup_detailed(toks)))
            if out.get("detail") != want_detail:
                raise harness.Finding(f"detail {out.get('detail')} != lookup_detailed {want_detail}")


_target: Target | None = None


def test_one_input(data: bytes) -> None:
    global _target
    if _target is None:
        _target = Target()
    _target(data)


def main() -> None:
    # The parser is native code atheris cannot see (cargo fuzz covers it: fuzz/rust/); the
    # oracle's branches, instrumented here, still reward inputs of new shapes.
    for fn in (python_tokens, Target.check_answer, Target.structured):
        atheris.instrument_func(fn)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
