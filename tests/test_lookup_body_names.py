"""``lookup_body_names``: which /lookup bodies name a namespace (and so leave the fast path),
against json.loads with every key kept (duplicates too) as the oracle."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache_rs import InvalidTypeError, lookup_body_names

NAMES = ("model", "lora_name", "cache_salt")


class Pairs(list):
    """A JSON object's (key, value) pairs, every duplicate kept."""


def oracle(body: bytes) -> bool | None:
    """Whether some top-level key in NAMES has a non-null value; None for a body that is not
    JSON (the lookup refuses it however it is routed)."""
    try:
        top = json.loads(body, object_pairs_hook=Pairs)
    except (ValueError, RecursionError):
        return None
    return isinstance(top, Pairs) and any(k in NAMES and v is not None for k, v in top)


keys = st.sampled_from(["tokens", "model", "lora_name", "cache_salt", "x", "modelx", "]", '"'])
values = st.one_of(
    st.none(), st.text(max_size=4), st.integers(-5, 10**12), st.booleans(),
    st.lists(st.integers(0, 2**32), max_size=40), st.lists(st.one_of(st.text(max_size=3), st.integers(0, 9)), max_size=4),
    st.dictionaries(st.sampled_from(["model", "y"]), st.text(max_size=2), max_size=2),
)


@st.composite
def bodies(draw) -> bytes:
    pairs = draw(st.lists(st.tuples(keys, values), max_size=5))
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
    members = [json.dumps(k, ensure_ascii=draw(st.booleans())) + sep[1] + json.dumps(v, separators=sep)
               for k, v in pairs]
    body = ("{" + sep[0].join(members) + "}").encode()
    if draw(st.booleans()):  # a key spelled with an escape: the same key to a JSON parser
        body = body.replace(b'"model"', b'"\\u006dodel"', 1)
    if draw(st.integers(0, 3)) == 0 and body:  # one byte cut, doubled or changed
        at = draw(st.integers(0, len(body) - 1))
        how = draw(st.integers(0, 2))
        new = b"" if how == 0 else body[at:at + 1] * 2 if how == 1 else bytes([draw(st.sampled_from(b'[]{}",:n0 '))])
        body = body[:at] + new + body[at + 1:]
    return body


@settings(max_examples=3000, deadline=None)
@given(bodies())
def test_names_as_json_loads_reads_them(body):
    want = oracle(body)
    if want is not None:
        assert lookup_body_names(body, NAMES) == want, body


def test_usual_bodies_and_arguments():
    tokens = ",".join(map(str, range(4096)))
    assert not lookup_body_names(b'{"tokens": [%s]}' % tokens.encode(), NAMES)
    assert lookup_body_names(b'{"tokens": [%s], "model": "m"}' % tokens.encode(), NAMES)
    assert not lookup_body_names(b'{"model": "m", "tokens": [1]}', ())
    assert not lookup_body_names(b'[["model", "m"]]', NAMES)  # JSON, not an object
    assert lookup_body_names(b'{"tokens": [1]}', ("tokens",))
    with pytest.raises(InvalidTypeError):
        lookup_body_names(b"{}", ["model"])
    with pytest.raises(InvalidTypeError):
        lookup_body_names(b"{}", ("model", 1))
