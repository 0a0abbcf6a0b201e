"""The engine's forward passes: prefill a padded batch, decode one token per sequence.

Both compose the adapter's per-layer pieces with a K/V destination. `decode_step` runs the one decode layer
(engine/decode/layer.py) over the GPU cache, written with static shapes and no host synchronisation so that it
can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from engine.adapters import DecoderAdapter
from engine.decode.attention import decode_attention_torch, prefill_attention
from engine.decode.kv_cache import KVCache
from engine.decode.layer import DecodeAttention, decode_layer
from engine.streams import side_stream


class PrefixSink(Protocol):
    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, *, rows: slice) -> None: ...


# Prefill runs its per-token stages (norms, projections, RoPE, MLP) over slices of at most this many tokens,
# so their temporaries (fp32 norms, the MLP's intermediate) stay bounded however long the batch of prompts.
PREFILL_SLICE_TOKENS = 16384
# Prefill takes the sequences of a batch in groups of at most this many (padded) tokens, at least one sequence
# each: a group's Q, K, V, attention input and output are the only whole-sequence temporaries, so a batch of
# 128K-token prompts holds one prompt's at a time. Below it (B8 x 2048), one group: whole-batch GEMMs.
PREFILL_GROUP_TOKENS = 32768


def sequence_groups(batch: int, num_tokens: int) -> list[slice]:
    size = max(1, PREFILL_GROUP_TOKENS // max(1, num_tokens))
    return [slice(b, min(b + size, batch)) for b in range(0, batch, size)]


@torch.inference_mode()
def prefill(adapter: DecoderAdapter, cache: KVCache | PrefixSink, token_ids: torch.Tensor,
            prompt_lens: Sequence[int] | torch.Tensor, *,
            progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """token_ids (B, T) right-padded, prompt_lens (B,) -> logits (B, vocab) at each prompt's last token.

    Fills the cache for positions 0..T-1 (an offloaded run's cache also takes each layer's attention input X,
    from which later steps may recompute K/V). Memory: the batch's hidden state, plus one group of sequences'
    per-layer temporaries (sequence_groups), plus per-token stages over slices. `progress(layers_done, layers)`
    is called after every layer."""
    spec = adapter.spec
    lens = [int(n) for n in prompt_lens]
    batch, num_tokens = token_ids.shape
    positions = torch.arange(num_tokens, device=token_ids.device)[None, :]
    hidden = adapter.embed(token_ids, positions.expand(batch, num_tokens))
    # RoPE tables for positions 0..T-1 once, (1, T, R), broadcast over the batch: the position-dependent RoPE types
    # choose their frequencies from the longest position, as transformers does for the whole batch.
    ropes = adapter.rope(hidden[:1], positions)
    groups = sequence_groups(batch, num_tokens)
    for layer in range(spec.num_layers):
        rope = ropes[layer]
        for rows in groups:
            group = hidden[rows]  # a view: the MLP writes the group's new state back in place
            group_lens = lens[rows]
            x, q, k, v = _projections(adapter, layer, group, rope)
            cache.write_prefix(layer, k, v, x, rows=rows)
            full = all(n == num_tokens for n in group_lens)
            attn = prefill_attention(q, k, v, None if full else group_lens, scale=spec.attention_scale,
                                     window=spec.window(layer), softcap=spec.attn_softcap)
            del q, k, v, x
            flat, attn_flat = group.view(-1, 1, group.shape[-1]), attn.view(-1, 1, attn.shape[-1])
            for part in _token_slices(flat.shape[0]):  # in place: each token's new state depends on its old one only
                flat[part] = adapter.mlp_block(layer, adapter.attn_output(layer, attn_flat[part], flat[part]))
            del attn
        if progress is not None:
            progress(layer + 1, spec.num_layers)
    last = hidden[torch.arange(batch, device=hidden.device), torch.as_tensor(lens, device=hidden.device) - 1]
    return adapter.logits(last).float()


def _token_slices(num_tokens: int) -> list[slice]:
    return [slice(i, min(i + PREFILL_SLICE_TOKENS, num_tokens)) for i in range(0, num_tokens, PREFILL_SLICE_TOKENS)]


def _projections(adapter: DecoderAdapter, layer: int, hidden: torch.Tensor, rope):
    """X, Q, K, V (G, T, ...) of one layer for a group of sequences; per-token stages over token slices (each
    token treated as a batch of one), so their temporaries stay bounded."""
    spec = adapter.spec
    batch, num_tokens, width = hidden.shape
    slices = _token_slices(batch * num_tokens)
    if len(slices) == 1:
        x = adapter.attn_input(layer, hidden)
        q, k, v = adapter.project_qkv(layer, x, rope)
        return x, q, k, v
    flat = hidden.reshape(-1, 1, width)
    x = torch.empty_like(hidden)
    q = hidden.new_empty(batch, num_tokens, spec.num_heads, spec.head_dim)
    k = hidden.new_empty(batch, num_tokens, spec.num_kv_heads, spec.head_dim)
    v = torch.empty_like(k)
    x_f, q_f, k_f, v_f = (t.view(-1, 1, *t.shape[2:]) for t in (x, q, k, v))
    rope_f = None if rope is None else tuple(r.expand(batch, num_tokens, r.shape[-1]).reshape(-1, 1, r.shape[-1])
                                             for r in rope)
    for part in slices:
        rope_part = None if rope_f is None else (rope_f[0][part], rope_f[1][part])
        x_f[part] = adapter.attn_input(layer, flat[part])
        q_f[part], k_f[part], v_f[part] = adapter.project_qkv(layer, x_f[part], rope_part)
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
    """`decode_step` without its inference_mode: what torch.compile traces (engine/decode/compiled.py).

    AOTAutograd cannot trace an inference_mode region ("Cannot set version_counter for inference
    tensor"), so the compiled step runs this under no_grad instead.
    """
    ids, pos = token_ids[:, None], positions[:, None]
    seq_lens = (positions + 1).to(torch.int32)  # once per step: the Triton kernel takes int32 lengths
    hidden = adapter.embed(ids, pos)
    ropes = adapter.rope(hidden, pos)
    for layer in range(adapter.spec.num_layers):
        hidden = decode_layer(adapter, layer, hidden, ropes[layer], positions, seq_lens, kv=cache, kv_len=kv_len,
                              attend=attend)
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
