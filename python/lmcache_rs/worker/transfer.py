"""Copies between a KV tensor ``[num_layers, 2, num_tokens, heads, head_dim]`` and pool slots.

A slot holds one chunk contiguously as ``[num_layers, 2, chunk_tokens, heads, head_dim]``. In
the caller's tensor the same chunk is ``2 * num_layers`` separate runs, so a chunk copy is a
gather (store) or a scatter (retrieve).

CPU tensors: a plain strided ``copy_``.

CUDA tensors (store; retrieve is the mirror image): two side streams and two staging
buffers of one slot each on the GPU. For chunk ``j`` the *gather* stream packs the chunk into
staging buffer ``j % 2`` (one kernel, at GPU memory speed), and the *copy* stream moves the
packed chunk to its pinned slot with one DMA (``non_blocking=True``). Events order the two, so
the gather of chunk ``j + 1`` overlaps the PCIe copy of chunk ``j`` and the copy engine stays
busy. Nothing waits on the host until one event after the last chunk: one synchronisation per
``store``/``retrieve``, none per chunk. The streams first wait for the caller's current
stream, so work already queued on ``kv`` is respected.
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch

# (start token, end token, slot tensor of shape [L, 2, end - start, H, D])
Span = tuple[int, int, torch.Tensor]


class Copier:
    def __init__(self, slot_bytes: int):
        self.slot_bytes = slot_bytes
        self._cuda: dict[int, _CudaLane] = {}

    def _lane(self, device: torch.device) -> "_CudaLane":
        index = device.index if device.index is not None else torch.cuda.current_device()
        lane = self._cuda.get(index)
        if lane is None:
            lane = self._cuda[index] = _CudaLane(torch.device("cuda", index), self.slot_bytes)
        return lane

    def gather(self, kv: torch.Tensor, spans: Sequence[Span]) -> None:
        """Copy ``kv[:, :, start:end]`` into each span's slot; returns when all are done."""
        if not spans:
            return
        if kv.device.type == "cuda":
            self._lane(kv.device).gather(kv, spans)
            return
        for start, end, slot in spans:
            slot.copy_(kv[:, :, start:end])

    def scatter(self, out: torch.Tensor, spans: Sequence[Span]) -> None:
        """Copy each span's slot into ``out[:, :, start:end]``; returns when all are done."""
        if not spans:
            return
        if out.device.type == "cuda":
            self._lane(out.device).scatter(out, spans)
            return
        for start, end, slot in spans:
            out[:, :, start:end].copy_(slot)


class _CudaLane:
    """Side streams and staging buffers of one GPU."""

    def __init__(self, device: torch.device, slot_bytes: int):
        self.device = device
        self.gather_stream = torch.cuda.Stream(device)
        self.copy_stream = torch.cuda.Stream(device)
        self.staging = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.lock = threading.Lock()  # one transfer at a time uses the staging buffers

    def _stage(self, b: int, slot: torch.Tensor) -> torch.Tensor:
        nbytes = slot.numel() * slot.element_size()
        return self.staging[b][:nbytes].view(slot.dtype).view(slot.shape)

    def gather(self, kv: torch.Tensor, spans: Sequence[Span]) -> None:
        with self.lock:
            self._gather(kv, spans)

    def scatter(self, out: torch.Tensor, spans: Sequence[Span]) -> None:
        with self.lock:
            self._scatter(out, spans)

    def _gather(self, kv: torch.Tensor, spans: Sequence[Span]) -> None:
        current = torch.cuda.current_stream(self.device)
        self.gather_stream.wait_stream(current)
        self.copy_stream.wait_stream(current)
        freed: list[torch.cuda.Event | None] = [None, None]  # staging b free again
        for j, (start, end, slot) in enumerate(spans):
            b = j & 1
            stage = self._stage(b, slot)
            packed = torch.cuda.Event()
            with torch.cuda.stream(self.gather_stream):
                if freed[b] is not None:
                    self.gather_stream.wait_event(freed[b])
                stage.copy_(kv[:, :, start:end])
                packed.record(self.gather_stream)
            done = torch.cuda.Event()
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(packed)
                slot.copy_(stage, non_blocking=True)
                done.record(self.copy_stream)
            freed[b] = done
        self.copy_stream.synchronize()

    def _scatter(self, out: torch.Tensor, spans: Sequence[Span]) -> None:
        current = torch.cuda.current_stream(self.device)
        self.gather_stream.wait_stream(current)
        self.copy_stream.wait_stream(current)
        freed: list[torch.cuda.Event | None] = [None, None]
        for j, (start, end, slot) in enumerate(spans):
            b = j & 1
            stage = self._stage(b, slot)
            landed = torch.cuda.Event()
            with torch.cuda.stream(self.copy_stream):
                if freed[b] is not None:
                    self.copy_stream.wait_event(freed[b])
                stage.copy_(slot, non_blocking=True)
                landed.record(self.copy_stream)
            done = torch.cuda.Event()
            with torch.cuda.stream(self.gather_stream):
                self.gather_stream.wait_event(landed)
                out[:, :, start:end].copy_(stage)
                done.record(self.gather_stream)
            freed[b] = done
        self.gather_stream.synchronize()
        # the caller's stream sees ``out`` complete
        current.wait_stream(self.gather_stream)
