"""Fused projection weights built in place: [W_q; W_k; W_v] and [W_gate; W_up] as one tensor each, with the original
Linear modules' weights re-pointed at row blocks of it.

Memory-neutral: the fused tensor takes the bytes the separate weights gave back (peak: one layer's projections
extra, while it is built), and the modules keep working on the same memory, so the plain adapter and transformers'
own forward compute exactly what they did. Checkpoints on disk are untouched. Building is idempotent: weights that
already lie back to back in one storage are taken as the fused tensor as they are.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _back_to_back(tensors: Sequence[torch.Tensor]) -> bool:
    """Contiguous tensors of one storage, each starting where the previous one ends."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def _span(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensor covering back-to-back tensors of equal trailing shape, stacked along dim 0 (a view)."""
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    shape = (rows, *first.shape[1:])
    return first.as_strided(shape, torch.empty(shape, device="meta").stride(), first.storage_offset())


@torch.no_grad()
@torch.inference_mode(False)  # called inside inference mode, it must still make ordinary tensors of the weights
def fuse_parameters(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """One tensor stacking `params` along dim 0; each parameter's data becomes a view of its rows."""
    data = [p.data for p in params]
    if _back_to_back(data):
        return _span(data)
    first = data[0]
    assert all(d.shape[1:] == first.shape[1:] and d.dtype == first.dtype and d.device == first.device for d in data), \
        [(d.shape, d.dtype, d.device) for d in data]
    fused = torch.empty((sum(d.shape[0] for d in data), *first.shape[1:]), dtype=first.dtype, device=first.device)
    row = 0
    for p, d in zip(params, data):
        rows = d.shape[0]
        fused[row:row + rows].copy_(d)
        p.data = fused[row:row + rows]  # the old storage is freed with its last reference
        row += rows
    return fused


def fuse_linears(linears: Sequence[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fused weight (sum N_i, K), fused bias or None) of Linear modules sharing K; biases: all or none."""
    has_bias = [lin.bias is not None for lin in linears]
    assert all(has_bias) or not any(has_bias), "fusing Linear modules needs all of them with a bias or none"
    weight = fuse_parameters([lin.weight for lin in linears])
    bias = fuse_parameters([lin.bias for lin in linears]) if all(has_bias) else None
    return weight, bias


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (what they hold in memory, views counted once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
