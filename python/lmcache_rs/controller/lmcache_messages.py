"""LMCache's controller wire vocabulary (LMCache 0.5.x), as msgspec structs.

LMCache workers encode every message as a msgpack map with a ``"type"`` key naming the class
(msgspec's tagged structs); the field names and the tags below are that wire contract, so an
unchanged LMCache worker decodes what we send and we decode what it sends. Only the messages
that cross between a worker and the controller are defined; each union below is what one
socket may carry.

Decoding never trusts the peer: the decoders are typed (a wrong field type is a
``msgspec.ValidationError``), and the sockets cap the frame size before a byte is decoded.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec


class _Msg(msgspec.Struct, tag=True, forbid_unknown_fields=False, gc=False):
    """Tagged by class name, as LMCache's ``MsgBase``. Decoded messages are trees of ints,
    strs and lists: not tracked by the garbage collector (ingest decodes millions)."""


# -- worker -> controller, PUSH (no reply) ---------------------------------------------------
# One op of a batch. LMCache's KVOpEvent is an untagged map {"op_type": "admit" | "evict",
# "key": int, "seq_num": int}; its op_type serves as a tag here, so each op decodes straight to
# its kind, with no enum and no per-op test.
class AdmitOp(msgspec.Struct, tag_field="op_type", tag="admit", gc=False):
    key: int
    seq_num: int


class EvictOp(msgspec.Struct, tag_field="op_type", tag="evict", gc=False):
    # The same wire field under another attribute name: reading ``.key`` over a batch's ops
    # stops at the first evict (AttributeError), so an all-admit batch takes one pass.
    evicted_key: int = msgspec.field(name="key")
    seq_num: int


class BatchedKVOperationMsg(_Msg):
    instance_id: str
    worker_id: int
    location: str
    operations: list[Union[AdmitOp, EvictOp]]


class KVAdmitMsg(_Msg):
    """Single-op form of older workers."""

    instance_id: str
    worker_id: int
    key: int
    location: str
    seq_num: int = 0


class KVEvictMsg(_Msg):
    instance_id: str
    worker_id: int
    key: int
    location: str
    seq_num: int = 0


class DeRegisterMsg(_Msg):
    instance_id: str
    worker_id: int
    ip: str
    port: int


class FullSyncBatchMsg(_Msg):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    batch_id: int
    keys: list[int]


class FullSyncEndMsg(_Msg):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    actual_total_keys: int


PushMsg = Union[BatchedKVOperationMsg, KVAdmitMsg, KVEvictMsg, DeRegisterMsg, FullSyncBatchMsg, FullSyncEndMsg]


# -- worker -> controller, DEALER/ROUTER (a reply each) --------------------------------------
class RegisterMsg(_Msg):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: Optional[str]


class HeartbeatMsg(_Msg):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: Optional[str]


class BatchedP2PLookupMsg(_Msg):
    hashes: list[int]
    instance_id: str
    worker_id: int


class FullSyncStartMsg(_Msg):
    instance_id: str
    worker_id: int
    location: str
    sync_id: str
    total_keys: int
    batch_count: int


class FullSyncStatusMsg(_Msg):
    instance_id: str
    worker_id: int
    sync_id: str


RequestMsg = Union[RegisterMsg, HeartbeatMsg, BatchedP2PLookupMsg, FullSyncStartMsg, FullSyncStatusMsg]


class RegisterRetMsg(_Msg):
    extra_config: dict[str, str] = {}


class FullSyncCommand(msgspec.Struct, tag_field="command_type", tag="full_sync"):
    """A heartbeat command (its own tagged union, tag field ``command_type``)."""

    reason: Optional[str] = None
    args: Optional[dict[str, Any]] = None


class HeartbeatRetMsg(_Msg):
    commands: list[FullSyncCommand] = []


class BatchedP2PLookupRetMsg(_Msg):
    # (instance_id, location, num_hit_chunks, peer_init_url); a miss is ("", "", 0, "")
    layout_info: list[tuple[str, str, int, str]]


class FullSyncStartRetMsg(_Msg):
    sync_id: str
    accepted: bool
    error_msg: Optional[str] = None


class FullSyncStatusRetMsg(_Msg):
    sync_id: str
    is_complete: bool
    global_progress: float
    can_exit_freeze: bool
    missing_batches: list[int] = []


class ErrorMsg(_Msg):
    error: str


# -- controller -> worker, REQ/REP -----------------------------------------------------------
class ClearWorkerMsg(_Msg):
    worker_event_id: str
    location: str


class PinWorkerMsg(_Msg):
    worker_event_id: str
    location: str
    tokens: list[int]


class CompressWorkerMsg(_Msg):
    worker_event_id: str
    method: str
    location: str
    tokens: Optional[list[int]] = None


class DecompressWorkerMsg(_Msg):
    worker_event_id: str
    method: str
    location: str
    tokens: Optional[list[int]] = None


class MoveWorkerMsg(_Msg):
    worker_event_id: str
    old_position: str
    new_position: tuple[str, str]  # (target peer_init_url, location)
    tokens: Optional[list[int]] = None
    copy: Optional[bool] = True


class HealthWorkerMsg(_Msg):
    worker_event_id: str


class CheckFinishWorkerMsg(_Msg):
    worker_event_id: str


class ClearWorkerRetMsg(_Msg):
    num_tokens: int


class PinWorkerRetMsg(_Msg):
    num_tokens: int


class CompressWorkerRetMsg(_Msg):
    num_tokens: int


class DecompressWorkerRetMsg(_Msg):
    num_tokens: int


class MoveWorkerRetMsg(_Msg):
    num_tokens: int


class HealthWorkerRetMsg(_Msg):
    error_code: int


class CheckFinishWorkerRetMsg(_Msg):
    status: str


ControlReply = Union[
    ClearWorkerRetMsg, PinWorkerRetMsg, CompressWorkerRetMsg, DecompressWorkerRetMsg, MoveWorkerRetMsg,
    HealthWorkerRetMsg, CheckFinishWorkerRetMsg, ErrorMsg,
]

push_decoder = msgspec.msgpack.Decoder(PushMsg)
push_json_decoder = msgspec.json.Decoder(PushMsg)
request_decoder = msgspec.msgpack.Decoder(RequestMsg)
request_json_decoder = msgspec.json.Decoder(RequestMsg)
control_reply_decoder = msgspec.msgpack.Decoder(ControlReply)
encoder = msgspec.msgpack.Encoder()


def decode_push(frame: bytes) -> Any:
    """A PUSH frame: msgpack, or JSON when it starts with ``{`` (as LMCache accepts from
    external producers). Raises msgspec.DecodeError / ValidationError."""
    if frame[:1] == b"{":
        return push_json_decoder.decode(frame)
    return push_decoder.decode(frame)


def decode_request(frame: bytes) -> Any:
    if frame[:1] == b"{":
        return request_json_decoder.decode(frame)
    return request_decoder.decode(frame)
