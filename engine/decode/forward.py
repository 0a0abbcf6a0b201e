"""The engine's forward passes: prefill a padded batch, decode one token per sequence.

Both compose the adapter's per-layer pieces with the engine's KV cache. `decode_step` is written with
static shapes and no host synchronisation so that it can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from engine.adapters import DecoderAdapter
from engine.attention import decode_attention_torch, prefill_attention
from engine.kv_cache import KVCache
from engine.streams import side_stream


class PrefixSink(Protocol):
    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None: ...


class DecodeAttention(Protocol):
    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                 scale: float, window: int | None) -> torch.Tensor: ...


# Prefill runs its per-token stages (norms, projections, RoPE, MLP) over slices of at most this many tokens,
# so their temporaries (fp32 norms, the MLP's intermediate) stay bounded however long the batch of prompts;
# only attention sees the whole sequence. Below it, one slice: the usual full-batch GEMMs.
PREFILL_SLICE_TOKENS = 16384


@torch.inference_mode()
def prefill(adapter: DecoderAdapter, cache: KVCache | PrefixSink, token_ids: torch.Tensor, prompt_lens: torch.Tensor, *,
            all_full: bool) -> torch.Tensor:
    """token_ids (B, T) right-padded, prompt_lens (B,) -> logits (B, vocab) at each prompt's last token.

    Fills the cache for positions 0..T-1 (an offloaded run's cache also takes each layer's attention input X,
    from which later steps may recompute K/V). `all_full`: every prompt is T long (no padding mask needed).
    """
    spec = adapter.spec
    batch, num_tokens = token_ids.shape
    positions = torch.arange(num_tokens, device=token_ids.device).expand(batch, num_tokens)
    hidden = adapter.embed(token_ids, positions)
    rope = adapter.rope(hidden, positions)
    lens = None if all_full else prompt_lens
    slices = _token_slices(batch * num_tokens)
    for layer in range(spec.num_layers):
        if len(slices) == 1:
            x = adapter.attn_input(layer, hidden)
            q = adapter.project_q(layer, x, rope)
            k, v = adapter.project_kv(layer, x, rope)
        else:
            x, q, k, v = _sliced_projections(adapter, layer, hidden, rope, slices)
        cache.write_prefix(layer, k, v, x)
        attn = prefill_attention(q, k, v, lens, scale=adapter.attention_scale, window=spec.sliding_window)
        del q, k, v, x
        if len(slices) == 1:
            hidden = adapter.mlp_block(layer, adapter.attn_output(layer, attn, hidden))
        else:
            flat, attn_flat = hidden.view(-1, 1, hidden.shape[-1]), attn.view(-1, 1, attn.shape[-1])
            for part in slices:  # in place: each token's new state depends on its old one only
                flat[part] = adapter.mlp_block(layer, adapter.attn_output(layer, attn_flat[part], flat[part]))
        del attn
    last = hidden[torch.arange(batch, device=hidden.device), prompt_lens - 1]  # (B, hidden)
    return adapter.logits(last).float()


def _token_slices(num_tokens: int) -> list[slice]:
    return [slice(i, min(i + PREFILL_SLICE_TOKENS, num_tokens)) for i in range(0, num_tokens, PREFILL_SLICE_TOKENS)]


def _sliced_projections(adapter: DecoderAdapter, layer: int, hidden: torch.Tensor, rope, slices: list[slice]):
    """X, Q, K, V (B, T, ...) of one layer, computed over token slices (each token treated as a batch of one)."""
    spec = adapter.spec
    batch, num_tokens, width = hidden.shape
    flat = hidden.view(-1, 1, width)
    x = torch.empty_like(hidden)
    q = hidden.new_empty(batch, num_tokens, spec.num_heads, spec.head_dim)
    k = hidden.new_empty(batch, num_tokens, spec.num_kv_heads, spec.head_dim)
    v = torch.empty_like(k)
    x_f, q_f, k_f, v_f = (t.view(-1, 1, *t.shape[2:]) for t in (x, q, k, v))
    rope_f = None if rope is None else tuple(r.reshape(-1, 1, r.shape[-1]) for r in rope)
    for part in slices:
        rope_part = None if rope_f is None else (rope_f[0][part], rope_f[1][part])
        x_f[part] = adapter.attn_input(layer, flat[part])
        q_f[part] = adapter.project_q(layer, x_f[part], rope_part)
        k_f[part], v_f[part] = adapter.project_kv(layer, x_f[part], rope_part)
    return x, q, k, v


@torch.inference_mode()
def decode_step(adapter: DecoderAdapter, cache: KVCache, token_ids: torch.Tensor, positions: torch.Tensor, *,
                kv_len: int, attend: DecodeAttention = decode_attention_torch) -> torch.Tensor:
    """token_ids (B,) at positions (B,) -> logits (B, vocab); writes their K/V into the cache.

    Attention reads the first `kv_len` cache slots of each sequence, masked to its own length.
    """
    return decode_step_traceable(adapter, cache, token_ids, positions, kv_len=kv_len, attend=attend)


def decode_step_traceable(adapter: DecoderAdapter, cache: KVCache, token_ids: torch.Tensor, positions: torch.Tensor,
                          *, kv_len: int, attend: DecodeAttention = decode_attention_torch) -> torch.Tensor:
    """`decode_step` without its inference_mode: what torch.compile traces (engine/compiled_decode.py).

    AOTAutograd cannot trace an inference_mode region ("Cannot set version_counter for inference
    tensor"), so the compiled step runs this under no_grad instead.
    """
    spec = adapter.spec
    ids, pos = token_ids[:, None], positions[:, None]
    seq_lens = (positions + 1).to(torch.int32)  # once per step: the Triton kernel takes int32 lengths
    hidden = adapter.embed(ids, pos)
    rope = adapter.rope(hidden, pos)
    for layer in range(spec.num_layers):
        x = adapter.attn_input(layer, hidden)
        q = adapter.project_q(layer, x, rope)
        k, v = adapter.project_kv(layer, x, rope)
        cache.write_at(layer, k, v, positions)
        k_cache, v_cache = cache.layer(layer, kv_len)
        attn = attend(q[:, 0], k_cache, v_cache, seq_lens, scale=adapter.attention_scale, window=spec.sliding_window)
        hidden = adapter.attn_output(layer, attn.flatten(1)[:, None], hidden)
        hidden = adapter.mlp_block(layer, hidden)
    return adapter.logits(hidden[:, 0]).float()


class GraphedDecode:
    """A decode step captured once in a CUDA graph and replayed with new tokens and positions.

    Replaying one graph removes the per-kernel launch cost (hundreds of small kernels per step), which
    otherwise dominates decode at small batch. Inputs are copied into static buffers before replay.
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, batch: int,
                 device: torch.device, scratch_position: int, warmup: int = 2):
        # Warm-up runs really write K/V: aim them at a slot that every later step overwrites before
        # any attention reads it (a step writes its own position first, then reads keys up to it).
        self.token_ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.full((batch,), scratch_position, dtype=torch.long, device=device)
        stream = side_stream(device, "warm-up")
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # cuBLAS handles and autotuning happen outside the capture
                step(self.token_ids, self.positions)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.token_ids, self.positions)

    def __call__(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.token_ids.copy_(token_ids, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.graph.replay()
        return self.logits
