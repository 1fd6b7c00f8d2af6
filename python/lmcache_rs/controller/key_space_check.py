"""Detects a controller whose LMCache key-space settings differ from its LMCache workers'.

LMCache workers report chunk keys, never their hashing settings (PYTHONHASHSEED, NONE_HASH,
chunk size, the Python that hashes). A controller configured differently computes other keys
for every /lookup and silently never matches. The symptom is visible from here: LMCache
workers hold chunks, lookups of at least one full chunk keep coming, and none of them ever
matches an LMCache instance.

The /lookup fast path is left alone: once per interval, while nothing has matched yet, each
HTTP loop's ``Lookup`` is asked for one request body (it lets the next /lookup take the
general path, which hands over its body). A body is checked against the LMCache index one
interval later, by which time a worker serving that prompt has usually stored it, so a
correctly configured deployment confirms itself on its first routed prompt; the check then
stops for good. After ``needed`` sampled lookups without a match, one warning names the
likely causes and the ``mismatch`` state shows in /metrics.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("lmcache_rs.controller.lmcache")

UNCONFIRMED, MATCHED, MISMATCH = "unconfirmed", "matched", "mismatch"
STATES = (UNCONFIRMED, MATCHED, MISMATCH)


class KeySpaceCheck:
    def __init__(self, index: Any, chunk_size: int, needed: int, settings_text: str):
        self.index = index  # the LMCache key space's index
        self.chunk_size = chunk_size
        self.needed = needed  # sampled lookups without a match before the warning; 0: never check
        self.settings_text = settings_text  # this controller's key-space settings, for the warning
        self.lookups: list[Any] = []  # every HTTP loop's api.Lookup
        self.state = UNCONFIRMED
        self.unmatched = 0  # sampled full-chunk lookups that matched no LMCache instance
        self._due: list[bytes] = []  # bodies sampled at the last tick, checked at the next

    def watch(self, lookup: Any) -> None:
        self.lookups.append(lookup)

    def tick(self) -> None:
        """Check the bodies sampled at the previous tick and ask for new ones."""
        if self.state == MATCHED or not self.needed:
            return
        due = self._due
        self._due = [body for lookup in self.lookups if (body := lookup.take_sample()) is not None]
        if len(self.index) == 0:  # LMCache workers hold nothing (yet): a miss says nothing
            self._due = []
            return
        for body in due:
            tokens = self._tokens(body)
            if tokens is None or len(tokens) < self.chunk_size:
                continue
            if self.index.lookup(tokens):
                self._matched()
                return
            self.unmatched += 1
        if self.unmatched >= self.needed and self.state == UNCONFIRMED:
            self.state = MISMATCH
            log.warning(
                "LMCache key space: %d lookups of at least one full chunk matched none of the %d chunks LMCache "
                "workers hold. This controller most likely hashes tokens differently from the workers (%s). "
                "Check: (1) vLLM and the controller run with the same PYTHONHASHSEED; (2) --none-hash is 'auto' "
                "when vLLM is importable where LMCache runs, 0 when it is not; (3) --chunk-size equals LMCache's "
                "chunk_size; (4) --worker-python 3.10 for workers on Python 3.10. See docs/lmcache-compat.md, "
                "'Key space'.", self.unmatched, len(self.index), self.settings_text)
        for lookup in self.lookups:
            lookup.want_sample()

    def _matched(self) -> None:
        if self.state == MISMATCH:
            log.warning("LMCache key space: a lookup matched an LMCache instance after all; the earlier warning "
                        "about mismatched settings no longer applies")
        else:
            log.info("LMCache key space confirmed: a lookup matched an LMCache instance's chunks")
        self.state = MATCHED
        self._due = []
        for lookup in self.lookups:
            lookup.take_sample()  # drops an armed request: the fast path takes every one again

    @staticmethod
    def _tokens(body: bytes) -> list[int] | None:
        try:
            tokens = json.loads(body).get("tokens")
        except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
            return None
        if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < 2**32 for t in tokens):
            return None
        return tokens
