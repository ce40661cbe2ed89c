"""Copies between vLLM's paged KV tensors and flat chunk buffers — pure torch, CPU and CUDA.

A chunk holds one block of every layer: ``chunk = layer_0 bytes || layer_1 bytes || ...`` where a layer's
bytes are that block's slice of the layer's KV tensor, laid out contiguously in the tensor's own dim order
(block dim removed).  The block dim is found by size (the tensor dim equal to the number of blocks), so the
same code serves vLLM-CPU's block-major layout and the GPU backends' ``[2, num_blocks, ...]`` layouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KvLayout:
    """The engine's registered KV tensors, deduplicated (layers may share storage) and described."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> None:
        seen: set[int] = set()
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        for name, t in kv_caches.items():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            self.names.append(name)
            self.tensors.append(t)
        if not self.tensors:
            raise ValueError("no KV cache tensors were registered")
        t0 = self.tensors[0]
        dims = [d for d, n in enumerate(t0.shape) if n == num_blocks]
        if not dims:
            raise ValueError(f"no dim of KV tensor {tuple(t0.shape)} equals num_blocks={num_blocks}")
        self.block_dim = dims[0]
        self.device = t0.device
        self.dtype = t0.dtype
        self.block_shape = tuple(n for d, n in enumerate(t0.shape) if d != self.block_dim)
        self.layer_bytes = t0.select(self.block_dim, 0).numel() * t0.element_size()
        self.chunk_bytes = self.layer_bytes * len(self.tensors)
        # Block-major host tensors: one slice per (block, layer) is contiguous, so copies are single memcpys.
        self._direct = self.device.type == "cpu" and all(
            t.select(self.block_dim, 0).is_contiguous() for t in self.tensors)

    def describe(self) -> str:
        """Stable layout id, part of every chunk key's namespace."""
        dt = str(self.dtype).removeprefix("torch.")
        return f"{len(self.tensors)}L:{'x'.join(map(str, self.block_shape))}:{dt}"

    def _layer_views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """``buf``: a flat uint8 tensor of one chunk → per-layer typed views shaped like one block."""
        lb = self.layer_bytes
        return [buf[i * lb:(i + 1) * lb].view(self.dtype).view(self.block_shape) for i in range(len(self.tensors))]

    def save(self, block_ids: Sequence[int], dests: Sequence[torch.Tensor]) -> None:
        """Copy blocks into chunk buffers (flat uint8 host tensors of ``chunk_bytes``), in order."""
        if self._direct:
            for b, dst in zip(block_ids, dests, strict=True):
                for t, out in zip(self.tensors, self._layer_views(dst), strict=True):
                    out.copy_(t.select(self.block_dim, b))
            return
        idx = torch.tensor(list(block_ids), device=self.device, dtype=torch.long)
        for li, t in enumerate(self.tensors):
            rows = t.index_select(self.block_dim, idx).movedim(self.block_dim, 0).contiguous().cpu()
            for i, dst in enumerate(dests):
                self._layer_views(dst)[li].copy_(rows[i])

    def load(self, block_ids: Sequence[int], srcs: Sequence[torch.Tensor]) -> None:
        """Copy chunk buffers into the paged KV tensors at ``block_ids``."""
        if self._direct:
            for b, src in zip(block_ids, srcs, strict=True):
                for t, inp in zip(self.tensors, self._layer_views(src), strict=True):
                    t.select(self.block_dim, b).copy_(inp)
            return
        idx = torch.tensor(list(block_ids), device=self.device, dtype=torch.long)
        pin = self.device.type == "cuda"
        for li, t in enumerate(self.tensors):
            rows = torch.stack([self._layer_views(s)[li] for s in srcs])
            if pin:
                rows = rows.pin_memory()
            t.index_copy_(self.block_dim, idx, rows.to(self.device, non_blocking=pin).movedim(0, self.block_dim))
        if pin:
            torch.cuda.current_stream(self.device).synchronize()
