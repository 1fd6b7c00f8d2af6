"""Populate LMCache's own controller the way LMCache workers do (anchor side of http_bench).

Runs in the benchmark venv (.bench-venv) with LMCache installed, under the same
PYTHONHASHSEED as the controller (LMCache's chunk keys are Python's builtin hash). For each
instance it acts as that instance's worker 0, using LMCache's own message classes:

1. registration: a DEALER socket to the controller's ROUTER ("reply") port sends
   ``[b"", msgpack(RegisterMsg)]`` and waits for the ``RegisterRetMsg``
   (LMCacheWorker.register);
2. KV admits: a PUSH socket to the controller's PULL port sends ``BatchedKVOperationMsg``
   with ``KVOpEvent(ADMIT, chunk_hash, seq_num)`` operations, 50 per message and up to 50
   messages per multipart send (BatchedMessageSender's and LMCacheWorker.push's
   defaults). Chunk hashes come from ``ChunkedTokenDatabase().process_tokens(...,
   make_key=False)``, the function LMCache's controller uses to answer /lookup.

It then waits until /lookup sees every instance's last prompt, checks a sample of the
workload's queries against the expected answers, and prints a JSON summary.

``--phase e2e`` measures end-to-end admits/s instead: fresh instances (e2e0, ...) register
and push ``--admits`` admits of random keys the same way, then one probe prompt; the clock
stops when /lookup sees the probe (the PULL socket is handled in order, so everything
pushed before it has been applied).

    PYTHONHASHSEED=0 .bench-venv/bin/python benchmarks/anchors/lmcache_populate.py \\
        --pull 127.0.0.1:19001 --reply 127.0.0.1:19002 --http 127.0.0.1:19000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

import workload as wlmod  # noqa: E402
from common import log  # noqa: E402


def lmcache_keys(db, tokens) -> list[int]:
    return [h for _, _, h in db.process_tokens(tokens.tolist(), make_key=False)]


def http_lookup(http: str, tokens: list[int], timeout: float = 10.0) -> dict:
    body = json.dumps({"tokens": tokens}).encode()
    req = urllib.request.Request(
        f"http://{http}/lookup", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def answer_of(resp: dict) -> dict[str, int]:
    """LMCache's answer reduced to {instance: matched tokens}."""
    return {inst: int(v[1]) for inst, v in resp.get("layout_info", {}).items()}


def populate(args: argparse.Namespace) -> dict:
    if os.environ.get("PYTHONHASHSEED") is None:
        raise SystemExit("set PYTHONHASHSEED (the same as the controller's)")
    from lmcache.v1.token_database import ChunkedTokenDatabase

    wl = wlmod.http_workload(
        seed=args.seed, instances=args.instances, prompts_per_instance=args.prompts,
        prompt_tokens=args.prompt_tokens, chunk_size=256, queries=args.queries,
    )
    db = ChunkedTokenDatabase()  # chunk_size 256, the controller's own default
    log(f"lmcache: hashing {wl.stored_chunks} stored chunks the LMCache way")
    keys_per_inst = [[k for p in range(a.shape[0]) for k in lmcache_keys(db, a[p])] for a in wl.stored]

    ctx = zmq.Context()
    # 1. register every (instance, worker 0) over DEALER -> ROUTER
    for i, inst in enumerate(wl.instances):
        register(ctx, args.reply, inst, args.fake_worker_port + i)
    log(f"lmcache: registered {len(wl.instances)} workers")

    # 2. push admits: 50 ops per BatchedKVOperationMsg, up to 50 messages per send
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5_000)
    push.connect(f"tcp://{args.pull}")
    time.sleep(0.2)  # let the PUSH connection come up so the clock measures the controller
    frames: list[bytes] = []
    for i, inst in enumerate(wl.instances):
        frames += admit_frames(inst, keys_per_inst[i], args.ops_per_msg)
    total = sum(len(k) for k in keys_per_inst)
    probes = [(inst, wl.stored[i][-1].tolist()) for i, inst in enumerate(wl.instances)]
    t0 = time.perf_counter()
    for start in range(0, len(frames), args.msgs_per_send):
        push.send_multipart(frames[start:start + args.msgs_per_send])
    sent = time.perf_counter()
    # 3. wait until every instance's last prompt is fully visible
    deadline = time.time() + args.timeout
    pending = list(probes)
    while pending:
        inst, toks = pending[0]
        if answer_of(http_lookup(args.http, toks)).get(inst) == len(toks):
            pending.pop(0)
            continue
        if time.time() > deadline:
            raise SystemExit(f"LMCache controller did not show {inst}'s chunks in {args.timeout}s")
        time.sleep(0.02)
    done = time.perf_counter()
    log(f"lmcache: {total} chunk admits applied in {done - t0:.2f}s")

    # 4. check answers against the workload's expectations
    agree = 0
    checked = 0
    mismatches = []
    for toks, expected in wl.queries[: args.check]:
        got = answer_of(http_lookup(args.http, toks.tolist()))
        checked += 1
        if got == expected:
            agree += 1
        elif len(mismatches) < 3:
            mismatches.append({"expected": expected, "got": got})
    sample = http_lookup(args.http, wl.stored[0][0].tolist())
    push.close()
    ctx.term()
    return {
        "admits": total,
        "send_s": sent - t0,
        "end_to_end_s": done - t0,
        "admits_per_s": total / (done - t0),
        "checked": checked,
        "agree": agree,
        "mismatches": mismatches,
        "sample_lookup_prompt0_inst0": {k: v for k, v in sample.items() if k != "event_id"},
    }


def register(ctx, reply: str, inst: str, port: int) -> None:
    from lmcache.v1.cache_controller.message import Msg, RegisterMsg, RegisterRetMsg

    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://{reply}")
    reg = RegisterMsg(instance_id=inst, worker_id=0, ip="127.0.0.1", port=port, peer_init_url=None)
    dealer.send_multipart([b"", msgspec.msgpack.encode(reg)])
    ret = msgspec.msgpack.decode(dealer.recv_multipart()[-1], type=Msg)
    if not isinstance(ret, RegisterRetMsg):
        raise SystemExit(f"registration of {inst} answered {ret!r}")
    dealer.close()


def admit_frames(inst: str, keys: list[int], ops_per_msg: int, first_seq: int = 0) -> list[bytes]:
    from lmcache.v1.cache_controller.message import BatchedKVOperationMsg, KVOpEvent, OpType

    out = []
    for start in range(0, len(keys), ops_per_msg):
        ops = [KVOpEvent(op_type=OpType.ADMIT, key=k, seq_num=first_seq + start + j)
               for j, k in enumerate(keys[start:start + ops_per_msg])]
        out.append(msgspec.msgpack.encode(BatchedKVOperationMsg(
            instance_id=inst, worker_id=0, location=wlmod.LOCATION, operations=ops)))
    return out


def e2e(args: argparse.Namespace) -> dict:
    if os.environ.get("PYTHONHASHSEED") is None:
        raise SystemExit("set PYTHONHASHSEED (the same as the controller's)")
    import random

    from lmcache.v1.token_database import ChunkedTokenDatabase

    db = ChunkedTokenDatabase()
    rng = random.Random(args.seed + 100)
    n_workers = args.instances
    per_worker = args.admits // n_workers
    log(f"lmcache e2e: preparing {per_worker * n_workers:,} admits as BatchedKVOperationMsg "
        f"({args.ops_per_msg} ops each)")
    ctx = zmq.Context()
    insts = [f"e2e{w}" for w in range(n_workers)]
    for w, inst in enumerate(insts):
        register(ctx, args.reply, inst, args.fake_worker_port + 100 + w)
    per_inst = []
    for inst in insts:
        keys = [int(k) >> 1 for k in np.frombuffer(rng.randbytes(per_worker * 8), dtype="<u8").tolist()]
        per_inst.append(admit_frames(inst, keys, args.ops_per_msg))
    # interleave the workers' messages, as concurrent workers would arrive
    frames = [p[i] for i in range(max(len(p) for p in per_inst)) for p in per_inst if i < len(p)]
    probe = wlmod.random_tokens(rng, args.prompt_tokens)
    probe_keys = lmcache_keys(db, probe)
    frames += admit_frames(insts[0], probe_keys, args.ops_per_msg, first_seq=per_worker)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5_000)
    push.connect(f"tcp://{args.pull}")
    time.sleep(0.2)
    total = per_worker * n_workers + len(probe_keys)
    t0 = time.perf_counter()
    for start in range(0, len(frames), args.msgs_per_send):
        push.send_multipart(frames[start:start + args.msgs_per_send])
    sent = time.perf_counter()
    deadline = time.time() + args.timeout
    toks = probe.tolist()
    while answer_of(http_lookup(args.http, toks)).get(insts[0]) != len(toks):
        if time.time() > deadline:
            raise SystemExit(f"LMCache controller did not apply the e2e admits in {args.timeout}s")
        time.sleep(0.01)
    done = time.perf_counter()
    push.close()
    ctx.term()
    log(f"lmcache e2e: {total:,} admits applied in {done - t0:.3f}s")
    return {"admits": total, "messages": len(frames), "ops_per_msg": args.ops_per_msg,
            "send_s": sent - t0, "end_to_end_s": done - t0, "admits_per_s": total / (done - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["populate", "e2e"], default="populate")
    ap.add_argument("--admits", type=int, default=1_000_000, help="e2e: admits in all")
    ap.add_argument("--pull", required=True, help="controller PULL host:port")
    ap.add_argument("--reply", required=True, help="controller ROUTER host:port")
    ap.add_argument("--http", required=True, help="controller HTTP host:port")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=512, help="prompts per instance")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--check", type=int, default=64, help="queries to check against expectations")
    ap.add_argument("--ops-per-msg", type=int, default=50)
    ap.add_argument("--msgs-per-send", type=int, default=50)
    ap.add_argument("--fake-worker-port", type=int, default=18100,
                    help="port each worker says it serves commands on (never used here)")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--out", help="write the JSON summary here too")
    args = ap.parse_args()
    res = populate(args) if args.phase == "populate" else e2e(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
