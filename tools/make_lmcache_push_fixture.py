"""Write tests/fixtures/lmcache_push/lmcache_0_5_6.msgpack: pull-socket reads as LMCache 0.5.6's
own message classes encode them (run with the interop venv, where LMCache is installed):

    .venv-interop/bin/python tools/make_lmcache_push_fixture.py

The file is a msgpack array of reads, each an array of frames (bin), as one recv_multipart
returns them. Keys are LMCache's chain of Python int-tuple hashes (independent of
PYTHONHASHSEED), so a rerun gives the same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
from lmcache.v1.cache_controller.message import (BatchedKVOperationMsg, DeRegisterMsg, FullSyncBatchMsg,
                                                 FullSyncEndMsg, KVAdmitMsg, KVEvictMsg, KVOpEvent, OpType)

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lmcache_push" / "lmcache_0_5_6.msgpack"
CPU, DISK = "LocalCPUBackend", "LocalDiskBackend"


def keys(prompt: int, chunks: int, chunk_size: int = 4) -> list[int]:
    out, prev = [], 0  # NONE_HASH of workers without vLLM
    for c in range(chunks):
        prev = hash((prev, tuple(range(prompt * 1000 + c * chunk_size, prompt * 1000 + (c + 1) * chunk_size)), ()))
        out.append(prev)
    return out


def batch(instance: str, worker: int, location: str, ops: list[tuple[OpType, int]], first_seq: int) -> bytes:
    return msgspec.msgpack.encode(BatchedKVOperationMsg(
        instance_id=instance, worker_id=worker, location=location,
        operations=[KVOpEvent(op_type=kind, key=key, seq_num=first_seq + i) for i, (kind, key) in enumerate(ops)]))


def main() -> int:
    A, E = OpType.ADMIT, OpType.EVICT
    p0, p1, p2 = keys(0, 12), keys(1, 6), keys(2, 5)
    edge = [-(2**63), 2**63 - 1, -1, 0, 1]
    reads = [
        # one worker's admits, split into messages as its batching thread sends them
        [batch("inst0", 0, CPU, [(A, k) for k in p0[:5]], 0), batch("inst0", 0, CPU, [(A, k) for k in p0[5:]], 5)],
        # two workers, two locations, mixed admits and evicts, the keys at the ends of the range
        [batch("inst1", 1, DISK, [(A, k) for k in p1], 0),
         batch("inst0", 0, CPU, [(E, p0[11]), (E, p0[10]), (A, p2[0]), (A, p2[1]), (E, p0[9])], 12),
         batch("inst1", 1, CPU, [(A, k) for k in edge], 0),
         batch("inst1", 1, DISK, [(E, k) for k in p1[3:]], 6)],
        # older single-op messages, then a sequence gap (17 expected)
        [msgspec.msgpack.encode(KVAdmitMsg(instance_id="inst0", worker_id=0, key=p2[2], location=CPU, seq_num=0)),
         msgspec.msgpack.encode(KVEvictMsg(instance_id="inst0", worker_id=0, key=p2[2], location=CPU, seq_num=0)),
         batch("inst0", 0, CPU, [(A, k) for k in p2[2:]], 20)],
        # a full sync of inst1's disk (started by FullSyncStartMsg on the reply socket, sync "s1")
        [msgspec.msgpack.encode(FullSyncBatchMsg(instance_id="inst1", worker_id=1, location=DISK, sync_id="s1",
                                                 batch_id=0, keys=p1[:2])),
         batch("inst1", 1, DISK, [(A, p1[5])], 9),
         msgspec.msgpack.encode(FullSyncEndMsg(instance_id="inst1", worker_id=1, location=DISK, sync_id="s1",
                                               actual_total_keys=2)),
         batch("inst1", 1, DISK, [(A, p1[4])], 10)],
        # an unregistered worker, then inst1 leaves
        [batch("ghost", 0, CPU, [(A, k) for k in p0], 0),
         msgspec.msgpack.encode(DeRegisterMsg(instance_id="inst1", worker_id=1, ip="127.0.0.1", port=1)),
         batch("inst1", 1, CPU, [(A, p0[0])], 5)],
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(msgspec.msgpack.encode(reads))
    print(f"{OUT}: {sum(map(len, reads))} frames in {len(reads)} reads", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
