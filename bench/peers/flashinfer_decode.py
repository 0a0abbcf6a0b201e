"""FlashInfer's batch decode over a paged K/V cache, as a peer of our decode-attention kernel.

FlashInfer (`flashinfer-python`) is not a dependency of KV Lab: the bench imports it when the GPU
machine has it (carried as wheels, README "Decode attention"), and its kernels are built by its own
JIT on first use. The same K/V the other kernels read is laid out once, outside the timing, as
FlashInfer's HND pages: (num_pages, Hkv, page_tokens, D), one page table per sequence.
"""

from __future__ import annotations

import dataclasses

import torch

PAGE_TOKENS = 16  # the page size FlashInfer's own decode benchmarks and serving engines use
WORKSPACE_BYTES = 128 << 20


@dataclasses.dataclass(frozen=True)
class PagedKV:
    """A paged copy of (B, Hkv, S, D) K and V with the page tables FlashInfer's plan() takes."""

    k_pages: torch.Tensor  # (num_pages, Hkv, PAGE_TOKENS, D)
    v_pages: torch.Tensor
    indptr: torch.Tensor  # (B + 1,) int32: sequence b owns pages indices[indptr[b]:indptr[b+1]]
    indices: torch.Tensor  # (num_pages,) int32
    last_page_len: torch.Tensor  # (B,) int32: tokens used in each sequence's last page


def page_kv(k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor, page_tokens: int = PAGE_TOKENS) -> PagedKV:
    """Lays out (B, Hkv, S, D) K/V as pages; only each sequence's first seq_lens[b] tokens are paged."""
    batch, num_kv_heads, _, head_dim = k.shape
    lens = [int(n) for n in seq_lens.tolist()]
    if any(n < 1 or n > k.shape[2] for n in lens):
        raise ValueError(f"sequence lengths must be within 1..{k.shape[2]}, got {lens}")
    pages_per_seq = [-(-n // page_tokens) for n in lens]
    num_pages = sum(pages_per_seq)
    k_pages = k.new_zeros(num_pages, num_kv_heads, page_tokens, head_dim)
    v_pages = torch.zeros_like(k_pages)
    first = 0
    for b, (n, p) in enumerate(zip(lens, pages_per_seq)):
        padded = p * page_tokens
        for src, dst in ((k, k_pages), (v, v_pages)):
            chunk = src.new_zeros(num_kv_heads, padded, head_dim)
            chunk[:, :n] = src[b, :, :n]
            dst[first:first + p] = chunk.view(num_kv_heads, p, page_tokens, head_dim).transpose(0, 1)
        first += p
    device = k.device
    indptr = torch.tensor([0, *torch.tensor(pages_per_seq).cumsum(0).tolist()], dtype=torch.int32, device=device)
    last = torch.tensor([n - (p - 1) * page_tokens for n, p in zip(lens, pages_per_seq)], dtype=torch.int32, device=device)
    return PagedKV(k_pages, v_pages, indptr, torch.arange(num_pages, dtype=torch.int32, device=device), last)


def unpage_kv(paged: PagedKV, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of page_kv (zeros past each sequence's length): what a test compares with the input."""
    batch = paged.last_page_len.numel()
    _, num_kv_heads, page_tokens, head_dim = paged.k_pages.shape
    out = []
    for pages in (paged.k_pages, paged.v_pages):
        dense = pages.new_zeros(batch, num_kv_heads, seq_len, head_dim)
        for b in range(batch):
            ids = paged.indices[paged.indptr[b]:paged.indptr[b + 1]].long()
            n = (ids.numel() - 1) * page_tokens + int(paged.last_page_len[b])
            seq = pages[ids].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
            dense[b, :, :n] = seq[:, :n]
        out.append(dense)
    return out[0], out[1]


def flashinfer_version() -> str | None:
    try:
        import flashinfer
    except Exception:  # noqa: BLE001 - absent or broken: the bench records it and goes on
        return None
    return getattr(flashinfer, "__version__", "unknown")


class FlashInferDecode:
    """One planned BatchDecodeWithPagedKVCacheWrapper per (shape, tensor-core choice); call run(q, paged)."""

    def __init__(self, paged: PagedKV, num_heads: int, *, use_tensor_cores: bool):
        import flashinfer

        _, num_kv_heads, page_tokens, head_dim = paged.k_pages.shape
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=paged.k_pages.device)
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, kv_layout="HND",
                                                                     use_tensor_cores=use_tensor_cores)
        self.wrapper.plan(paged.indptr, paged.indices, paged.last_page_len, num_heads, num_kv_heads, head_dim,
                          page_tokens, pos_encoding_mode="NONE", q_data_type=paged.k_pages.dtype,
                          kv_data_type=paged.k_pages.dtype)

    def run(self, q: torch.Tensor, paged: PagedKV) -> torch.Tensor:
        """q (B, Hq, D) -> (B, Hq, D); the paged K/V must have the page tables this wrapper was planned with."""
        return self.wrapper.run(q, (paged.k_pages, paged.v_pages))
