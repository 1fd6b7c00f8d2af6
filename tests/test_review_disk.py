"""LocalDiskBackend recovery: damaged and malformed index lines are skipped with a warning."""

from __future__ import annotations

import json
import logging
import os

import torch

from lmcache_rs.config import GB, config_from_dict
from lmcache_rs.worker import KVWorker, synthetic_kv

CS = 4
SHAPE = dict(num_layers=2, num_kv_heads=2, head_dim=8)
CHUNK_BYTES = 2 * 2 * 2 * 8 * 2 * CS
TOKENS = [7000 + i for i in range(8)]


def make_config(disk):
    return config_from_dict({
        "chunk_size": CS,
        "max_local_cpu_size": 16 * CHUNK_BYTES / GB,
        "local_disk": f"file://{disk}",
        "max_local_disk_size": 64 * CHUNK_BYTES / GB,
        **SHAPE,
    })


def test_damaged_and_malformed_index_lines_are_skipped(tmp_path, caplog):
    kv = synthetic_kv(TOKENS, **SHAPE)
    with KVWorker(make_config(tmp_path)) as w:
        w.store(TOKENS, kv)
        w.flush()
        index_path = os.path.join(w.kvstore.disk.directory, "index.log")
    with open(index_path, encoding="utf-8") as handle:
        header, *records = handle.read().splitlines()
    bad = [
        "not json at all",  # damaged, not the last line: warned about
        json.dumps({"op": "put", "key": "zz"}),  # key not hex
        json.dumps({"op": "put", "key": "00000000000000dd"}),  # fields missing
        json.dumps([1, 2]),  # not a record
    ]
    with open(index_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join([header, *bad, *records]) + "\n")
    with caplog.at_level(logging.WARNING, logger="lmcache_rs.worker"):
        with KVWorker(make_config(tmp_path)) as w2:
            assert len(w2.kvstore.disk.entries) == 2
            assert torch.equal(w2.retrieve(TOKENS)[1], kv)
    assert "skipping damaged index line 2" in caplog.text
    assert caplog.text.count("skipping malformed index record") == 3
    with open(index_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines[0] == header and sorted(lines[1:]) == sorted(records)  # compacted
