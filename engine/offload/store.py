"""The buffers of an offloaded run, allocated once: pinned host store, GPU staging, GPU-resident K/V.

Layouts are position-major, so that any range of slots of one layer is one contiguous block and crosses PCIe
as a single copy:
- host K/V    (L, S_kv, B, 2, Hkv, D)   slots kv_range = [kv_lo, S)       pinned
- host X      (L, S_act, B, h)           slots act_range = [g, act_hi)     pinned (attention-input activations)
- resident    (L, g, B, 2, Hkv, D)       slots [0, g)                      GPU
- staging K/V (2, S, B, 2, Hkv, D)       all slots of one layer, two layers in flight           GPU
- staging X   (2, S_act, B, h)           one layer's activations, two layers in flight          GPU
- write-back  (L, B, 2, Hkv, D), (L, B, h): each layer's new token, read by the D2H stream        GPU
Row (slot, sequence) of a layer holds [K | V]: a range of slots is a (slots * B, 2 * Hkv * D) matrix, so the
recompute GEMMs write K and V straight into staging (as matrices with row stride 2 * Hkv * D), and a run of
sequences at one slot is one contiguous block for the write-back. Attention reads staging through
(B, Hkv, S, D) views; the kernels take strides, so no copy is made.

Host memory is page-locked with cudaHostRegister on a plain allocation rather than taken from torch's pinned
caching allocator, which rounds every block up to a power of two (a 35 GB store would pin 64 GB) and keeps it
cached after the run. `release()` unregisters and frees everything; runs call it whatever happens.
"""

from __future__ import annotations

import logging

import torch

from engine.adapters import ModelSpec
from engine.errors import OutOfMemoryError
from engine.memory import check_fits
from engine.scheduler import RunPlan


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


def _unpin(tensor: torch.Tensor) -> None:
    global _pinned_now
    if tensor.numel():
        error = torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
        code = getattr(error, "value", error)
        if code != 0:  # the range stays registered: say so rather than leave a later registration to fail
            logging.getLogger("kvlab").error("cudaHostUnregister of %d bytes failed with CUDA error %s",
                                             tensor.numel() * tensor.element_size(), code)
            return
        _pinned_now -= tensor.numel() * tensor.element_size()


class OffloadStore:
    def __init__(self, spec: ModelSpec, plan: RunPlan, *, dtype: torch.dtype, device: torch.device):
        self.spec, self.plan, self.device = spec, plan, device
        batch, S, g = plan.batch, plan.max_tokens, plan.resident_tokens
        layers, kv_heads, dim, hidden = spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden_size
        self.kv_lo, self.act_lo = plan.kv_range[0], plan.act_range[0]
        kv_slots, act_slots = plan.kv_range[1] - plan.kv_range[0], plan.act_range[1] - plan.act_range[0]
        self.act_slots = act_slots
        item = dtype.itemsize
        host_bytes = layers * batch * (kv_slots * 2 * kv_heads * dim + act_slots * hidden) * item
        gpu_bytes = (layers * g + 2 * S) * 2 * batch * kv_heads * dim * item + 2 * act_slots * batch * hidden * item \
            + (2 * kv_heads * dim * hidden * item if plan.recompute_enabled else 0)
        self.host_bytes, self.gpu_bytes = host_bytes, gpu_bytes
        check_fits(host_bytes, torch.device("cpu"), what=f"the offloaded KV store ({plan.placement})",
                   fix="lower the batch or the sequence length, or use placement 'hybrid' with a larger GPU budget.")
        check_fits(gpu_bytes, device, what="the GPU-resident K/V and the staging buffers of an offloaded run",
                   fix="lower the GPU KV budget (placement 'hybrid'), the batch or the sequence length.")
        self.pinned = pins_host_memory(device)
        self._pinned_tensors: list[torch.Tensor] = []
        try:
            self.host_kv = self._host((layers, kv_slots, batch, 2, kv_heads, dim), dtype)
            self.host_act = self._host((layers, act_slots, batch, hidden), dtype)
            # Zeros: slots no step has written yet (and padding) are read by attention, masked; 0 * 0 is not NaN.
            self.resident = torch.zeros((layers, g, batch, 2, kv_heads, dim), dtype=dtype, device=device)
            self.stage_kv = torch.zeros((2, S, batch, 2, kv_heads, dim), dtype=dtype, device=device)
            self.stage_act = torch.zeros((2, act_slots, batch, hidden), dtype=dtype, device=device)
            self.new_kv = torch.zeros((layers, batch, 2, kv_heads, dim), dtype=dtype, device=device)
            self.new_act = torch.zeros((layers, batch, hidden), dtype=dtype, device=device)
            # The recompute GEMM's weight [W_k; W_v] (and bias), filled per layer from the model's two projections:
            # one GEMM writes whole [K | V] rows of staging. One buffer serves every layer (memory-neutral).
            kv_out = 2 * kv_heads * dim
            self.kv_weight = torch.empty((kv_out, hidden) if plan.recompute_enabled else (0, hidden), dtype=dtype,
                                         device=device)
            self.kv_bias = torch.empty(kv_out if plan.recompute_enabled else 0, dtype=dtype, device=device)
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
    def stage_views(self, slot: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (B, Hkv, kv_len, D) views of staging slot `slot`, what attention reads."""
        stage = self.stage_kv[slot, :kv_len]  # (kv_len, B, 2, Hkv, D)
        return stage[:, :, 0].permute(1, 2, 0, 3), stage[:, :, 1].permute(1, 2, 0, 3)

    def host_kv_slots(self, layer: int, lo: int, hi: int) -> torch.Tensor:
        return self.host_kv[layer, lo - self.kv_lo : hi - self.kv_lo]

    def host_act_slots(self, layer: int, lo: int, hi: int) -> torch.Tensor:
        return self.host_act[layer, lo - self.act_lo : hi - self.act_lo]

    def release(self) -> None:
        """Unpin and drop every buffer; safe to call twice."""
        for tensor in self._pinned_tensors:
            _unpin(tensor)
        self._pinned_tensors.clear()
        for name in ("host_kv", "host_act", "resident", "stage_kv", "stage_act", "new_kv", "new_act", "kv_weight",
                     "kv_bias"):
            if hasattr(self, name):
                delattr(self, name)
