"""Phi-3 and Phi-4 decoders: Llama-like, with fused projections (one qkv_proj, one gate_up_proj), partial rotary
(Phi-4-mini rotates 3/4 of each head) and LongRoPE (su) scaling past original_max_position_embeddings.

The rotary module, norms and MLP are transformers' own; K/V recomputation slices [W_k; W_v] out of the fused
qkv weight (rows are [q | k | v]), so its single GEMM computes exactly the K and V that qkv_proj computes.
"""

from __future__ import annotations

import torch

from engine.adapters.base import DecoderAdapter, ModelSpec, rotary_tables
from engine.adapters.config_facts import layer_types, rope_decoder_shape, rope_facts
from engine.adapters.llama import apply_rope
from engine.errors import UnsupportedArchitectureError


class Phi3Adapter(DecoderAdapter):
    family = "phi3"
    MODEL_TYPES = ("phi3",)

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.decoder = hf_model.model
        self.layers = self.decoder.layers
        self.notes: list[str] = []
        super().__init__(hf_model)

    def _make_spec(self) -> ModelSpec:
        c = self.config
        # Phi3Attention reads head_dim this way (hidden // heads unless the config names one).
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rotary_dim = 2 * self.decoder.rotary_emb.inv_freq.numel()
        if not 0 < rotary_dim <= head_dim:
            raise UnsupportedArchitectureError(
                f"phi3: RoPE over {rotary_dim} dims of {head_dim}-dim heads cannot run: check partial_rotary_factor "
                "and head_dim in config.json.")
        window, types = layer_types(c)
        rope_type, original_max = rope_facts(c)
        if rope_type == "longrope" and original_max is not None and original_max < c.max_position_embeddings:
            self.notes.append(
                f"LongRoPE: once a sequence passes {original_max} positions transformers switches to the long "
                "factors and recomputes its whole cache with them; KV Lab keeps each token's K as first computed, "
                "so it refuses a run that starts at or below that length and ends past it (prompts longer than it "
                "use the long factors throughout, as transformers does)")
        qkv = self.layers[0].self_attn.qkv_proj
        self._q_rows = c.num_attention_heads * head_dim
        return ModelSpec(
            family=self.family,
            model_type=c.model_type,
            **rope_decoder_shape(c, head_dim=head_dim),
            sliding_window=window,
            qkv_bias=qkv.bias is not None,
            qk_norm=False,
            **self._weight_facts(),
            layer_types=types,
            rotary_dim=None if rotary_dim == head_dim else rotary_dim,
            rope_type=rope_type,
            rope_original_max=original_max,
        )

    def embed(self, token_ids, positions):
        return self.decoder.embed_tokens(token_ids)

    def rope(self, hidden, positions):
        return (rotary_tables(self.decoder.rotary_emb, hidden, positions),) * self.spec.num_layers

    def logits(self, hidden):
        return self.hf_model.lm_head(self.decoder.norm(hidden))

    def attn_input(self, layer, hidden):
        return self.layers[layer].input_layernorm(hidden)

    def project_qkv(self, layer, x, rope):
        s = self.spec
        qkv = self.layers[layer].self_attn.qkv_proj(x)
        k_end = self._q_rows + s.num_kv_heads * s.head_dim
        q = qkv[..., : self._q_rows].unflatten(-1, (s.num_heads, s.head_dim))
        k = qkv[..., self._q_rows : k_end].unflatten(-1, (s.num_kv_heads, s.head_dim))
        v = qkv[..., k_end:].unflatten(-1, (s.num_kv_heads, s.head_dim))
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def kv_weight(self, layer):
        qkv = self.layers[layer].self_attn.qkv_proj
        bias = None if qkv.bias is None else qkv.bias[self._q_rows :]
        return qkv.weight[self._q_rows :], bias  # a view: rows [k | v] of the fused weight

    def attn_output(self, layer, attn, residual):
        return residual + self.layers[layer].self_attn.o_proj(attn)

    def mlp_block(self, layer, hidden):
        block = self.layers[layer]
        return hidden + block.mlp(block.post_attention_layernorm(hidden))
