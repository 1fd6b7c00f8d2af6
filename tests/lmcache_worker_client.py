"""An LMCache worker's reports to a controller in this process: registration on its reply
socket and BatchedKVOperationMsg admits on its pull socket, through real ZMQ sockets, encoded
with the controller's copies of LMCache's message classes."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from lmcache_rs.controller import lmcache_messages as m


async def report_admits(controller: Any, instance_id: str, worker_id: int,
                        batches: list[tuple[str, list[int]]], peer_init_url: str | None = None) -> None:
    """Register the worker, admit each (location, keys) batch in order (sequence numbers from
    0), and return once the LMCache index holds every distinct key sent."""
    bound = controller.lmcache.bound
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{bound['reply']}")
    await dealer.send_multipart([b"", msgspec.msgpack.encode(m.RegisterMsg(
        instance_id=instance_id, worker_id=worker_id, ip="127.0.0.1", port=1, peer_init_url=peer_init_url))])
    await dealer.recv_multipart()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{bound['pull']}")
    seq = 0
    for location, keys in batches:
        ops = [m.AdmitOp(key=k, seq_num=seq + i) for i, k in enumerate(keys)]
        seq += len(ops)
        await push.send(msgspec.msgpack.encode(m.BatchedKVOperationMsg(
            instance_id=instance_id, worker_id=worker_id, location=location, operations=ops)))
    distinct = len({k for _, keys in batches for k in keys})
    while len(controller.lmcache.index) < distinct:
        await asyncio.sleep(0.01)
    for sock in (dealer, push):
        sock.close(0)
    ctx.term()
