"""The buffers of an offloaded run, allocated once: pinned host store, GPU-resident K/V, GPU staging.

- resident    a KVCache (L, B, Hkv, g, D)       slots [0, g)                          GPU, read in place
- host K/V    (L, S_kv, B, 2, Hkv, D)            slots kv_range = [kv_lo, S)           pinned
- host X      (L, S_act, B, h)                    slots act_range = [g, act_hi)         pinned (attention inputs)
- staging K/V (2, S - g, B, 2, Hkv, D)           slots [g, S) of one layer, two layers in flight       GPU
- staging X   (2, S_act, B, h)                    one layer's activations, two layers in flight        GPU
- write-back  (L, B, 2, Hkv, D), (L, B, h): each layer's new token, read by the D2H stream             GPU
Host and staging layouts are position-major, so any range of offloaded slots of one layer is one contiguous block
and crosses PCIe as a single copy. Row (slot, sequence) of a layer holds [K | V]: a range of slots is a
(slots * B, 2 * Hkv * D) matrix, so the recompute GEMMs write K and V straight into staging (as matrices with row
stride 2 * Hkv * D), and a run of sequences at one slot is one contiguous block for the write-back. Attention reads
the resident cache and staging through (B, Hkv, S, D) views (K/V segments); the kernels take strides, so no copy is
made, and nothing copies resident K/V into staging: staging holds only the offloaded slots.

Host memory is page-locked with cudaHostRegister on a plain allocation rather than taken from torch's pinned
caching allocator, which rounds every block up to a power of two (a 35 GB store would pin 64 GB) and keeps it
cached after the run. `release()` unregisters and frees everything; runs call it whatever happens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.adapters import ModelSpec
from engine.decode.kv_cache import KVCache
from engine.errors import OutOfMemoryError
from engine.memory import check_fits
from engine.offload.scheduler import RunPlan
from kernels.segments import KVSegment

_pinned_now = 0  # bytes page-locked by stores and not yet released, all stores together


def pinned_bytes() -> int:
    """Host bytes page-locked by offload stores right now: 0 between runs, or a run leaked its store."""
    return _pinned_now


def pins_host_memory(device: torch.device) -> bool:
    """Whether a store for `device` page-locks its host buffers: only copies to a GPU need (and can use) DMA."""
    return device.type == "cuda"


def _pin(tensor: torch.Tensor) -> torch.Tensor:
    """Page-lock a CPU tensor's memory in place so copies from and to it are asynchronous DMA."""
    num_bytes = tensor.numel() * tensor.element_size()
    if num_bytes == 0:
        return tensor
    error = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), num_bytes, 0)
    code = getattr(error, "value", error)
    if code != 0:
        raise OutOfMemoryError(f"Could not page-lock {num_bytes / 2**30:.2f} GiB of host memory for the offloaded "
                               f"KV store (CUDA error {code}): lower the batch or the sequence length, use "
                               "placement 'hybrid' to keep part of the cache on the GPU, or free host memory.")
    global _pinned_now
    _pinned_now += num_bytes
    return tensor


def _unpin(tensor: torch.Tensor) -> bool:
    """Unregister a page-locked tensor; False (and a log line) when CUDA refuses, e.g. after its context was lost."""
    global _pinned_now
    if not tensor.numel():
        return True
    error = torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    code = getattr(error, "value", error)
    if code != 0:  # the range stays registered (after a lost context, until the process ends): say so
        logging.getLogger("kvlab").error("cudaHostUnregister of %d bytes failed with CUDA error %s",
                                         tensor.numel() * tensor.element_size(), code)
        return False
    _pinned_now -= tensor.numel() * tensor.element_size()
    return True


@dataclass(frozen=True)
class StoreSizes:
    """Bytes an offloaded run's store takes, before any is allocated."""

    host_bytes: int  # pinned host K/V and activations
    resident_bytes: int  # GPU-resident K/V
    staging_bytes: int  # GPU staging, write-back buffers and the recompute weight

    @property
    def gpu_bytes(self) -> int:
        return self.resident_bytes + self.staging_bytes


def store_sizes(spec: ModelSpec, plan: RunPlan, *, dtype_bytes: int) -> StoreSizes:
    batch, S, g = plan.batch, plan.max_tokens, plan.resident_tokens
    kv_slot = 2 * batch * spec.num_kv_heads * spec.head_dim * dtype_bytes  # one slot of every sequence, one layer
    act_slot = batch * spec.hidden_size * dtype_bytes
    kv_slots, act_slots = plan.kv_range[1] - plan.kv_range[0], plan.act_range[1] - plan.act_range[0]
    host = spec.num_layers * (kv_slots * kv_slot + act_slots * act_slot)
    resident = spec.num_layers * g * kv_slot
    kv_weight = 2 * spec.num_kv_heads * spec.head_dim * spec.hidden_size * dtype_bytes if plan.recompute_enabled else 0
    staging = 2 * staged_slots(plan) * kv_slot + 2 * act_slots * act_slot + spec.num_layers * (kv_slot + act_slot) \
        + kv_weight
    return StoreSizes(host_bytes=host, resident_bytes=resident, staging_bytes=staging)


def staged_slots(plan: RunPlan) -> int:
    """Slots [g, S) of a layer's staging; at least one, so every buffer and view has a shape."""
    return max(1, plan.max_tokens - plan.resident_tokens)


class OffloadStore:
    def __init__(self, spec: ModelSpec, plan: RunPlan, *, dtype: torch.dtype, device: torch.device):
        self.spec, self.plan, self.device = spec, plan, device
        batch, S, g = plan.batch, plan.max_tokens, plan.resident_tokens
        layers, kv_heads, dim, hidden = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden_size
        self.resident_tokens = g
        self.kv_lo, self.act_lo = plan.kv_range[0], plan.act_range[0]
        kv_slots, act_slots = plan.kv_range[1] - plan.kv_range[0], plan.act_range[1] - plan.act_range[0]
        self.act_slots = act_slots
        sizes = store_sizes(spec, plan, dtype_bytes=dtype.itemsize)
        self.host_bytes, self.gpu_bytes = sizes.host_bytes, sizes.gpu_bytes
        check_fits(sizes.host_bytes, torch.device("cpu"), what=f"the offloaded KV store ({plan.placement})",
                   fix="lower the batch or the sequence length, or use placement 'hybrid' with a larger GPU budget.")
        check_fits(sizes.gpu_bytes, device, what="the GPU-resident K/V and the staging buffers of an offloaded run",
                   fix="lower the GPU KV budget (placement 'hybrid'), the batch or the sequence length.")
        self.pinned = pins_host_memory(device)
        self._pinned_tensors: list[torch.Tensor] = []
        try:
            self.host_kv = self._host((layers, kv_slots, batch, 2, kv_heads, dim), dtype)
            self.host_act = self._host((layers, act_slots, batch, hidden), dtype)
            # Zeros: slots no step has written yet (and padding) are read by attention, masked; 0 * 0 is not NaN.
            self.resident = KVCache(spec, batch=batch, max_tokens=g, dtype=dtype, device=device)
            self.stage_kv = torch.zeros((2, staged_slots(plan), batch, 2, kv_heads, dim), dtype=dtype, device=device)
            self.stage_act = torch.zeros((2, act_slots, batch, hidden), dtype=dtype, device=device)
            self.new_kv = torch.zeros((layers, batch, 2, kv_heads, dim), dtype=dtype, device=device)
            self.new_act = torch.zeros((layers, batch, hidden), dtype=dtype, device=device)
            # Prefill writes slots [0, prompt) of every row; later slots are written one token per step and row,
            # so a shorter row's slots can be read (masked) before any write: zero them, never garbage.
            first_new = plan.prompt_tokens
            self.host_kv[:, max(0, first_new - self.kv_lo):].zero_()
            self.host_act[:, max(0, first_new - self.act_lo):].zero_()
        except BaseException:
            self.release()
            raise

    def _host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype)
        if self.pinned:
            _pin(tensor)
            self._pinned_tensors.append(tensor)
        return tensor

    # -- views ---------------------------------------------------------------------------------------------
    def staged_segment(self, slot: int, kv_len: int) -> KVSegment:
        """Staging slot `slot` as the segment of positions [g, kv_len): (B, Hkv, kv_len - g, D) views."""
        g = self.resident_tokens
        stage = self.stage_kv[slot, : max(0, kv_len - g)]  # (n, B, 2, Hkv, D)
        return KVSegment(stage[:, :, 0].permute(1, 2, 0, 3), stage[:, :, 1].permute(1, 2, 0, 3), g)

    def resident_segment(self, layer: int, kv_len: int) -> KVSegment:
        k, v = self.resident.layer(layer, min(kv_len, self.resident_tokens))
        return KVSegment(k, v, 0)

    def stage_kv_slots(self, slot: int, lo: int, hi: int) -> torch.Tensor:
        """Staging rows of positions [lo, hi) (all >= g): (hi - lo, B, 2, Hkv, D)."""
        g = self.resident_tokens
        return self.stage_kv[slot, lo - g : hi - g]

    def stage_act_slots(self, slot: int, lo: int, hi: int) -> torch.Tensor:
        return self.stage_act[slot, lo - self.act_lo : hi - self.act_lo]

    def host_kv_slots(self, layer: int, lo: int, hi: int) -> torch.Tensor:
        return self.host_kv[layer, lo - self.kv_lo : hi - self.kv_lo]

    def host_act_slots(self, layer: int, lo: int, hi: int) -> torch.Tensor:
        return self.host_act[layer, lo - self.act_lo : hi - self.act_lo]

    def release(self) -> bool:
        """Unpin and drop every buffer; safe to call twice. -> False if CUDA refused to unregister some of it."""
        unpinned = self.release_host()
        for name in ("resident", "stage_kv", "stage_act", "new_kv", "new_act"):
            if hasattr(self, name):
                delattr(self, name)
        return unpinned

    def release_host(self) -> bool:
        """Unpin and drop the host buffers only (what is left to do once the GPU context is lost: the GPU buffers
        must stay). The memory is freed whether or not CUDA agrees to unregister it."""
        unpinned = all([_unpin(tensor) for tensor in self._pinned_tensors])
        self._pinned_tensors.clear()
        for name in ("host_kv", "host_act"):
            if hasattr(self, name):
                delattr(self, name)
        return unpinned
