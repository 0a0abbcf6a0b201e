"""Llama-style decoders: Llama 2/3, Mistral (sliding window), Qwen2/2.5 (qkv bias), Qwen3 (q/k norm)."""

from __future__ import annotations

import torch

from engine.adapters.base import DecoderAdapter, ModelSpec, rotary_tables
from engine.adapters.config_facts import layer_types, rope_decoder_shape, rope_facts


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin (B, T, R) with R <= D: rotate the first R dims of each head at its token's position
    (transformers' rotate_half convention), pass the rest through (partial rotary)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


class SeparateProjections:
    """The attention-side pieces of decoders whose layers hold input_layernorm and q/k/v projections of their own
    (optional q/k norms, RoPE at the tokens' positions): the Llama family and Gemma share them."""

    def attn_input(self, layer, hidden):
        return self.layers[layer].input_layernorm(hidden)

    def project_qkv(self, layer, x, rope):
        attn, s = self.layers[layer].self_attn, self.spec
        q = attn.q_proj(x).unflatten(-1, (s.num_heads, s.head_dim))
        k = attn.k_proj(x).unflatten(-1, (s.num_kv_heads, s.head_dim))
        v = attn.v_proj(x).unflatten(-1, (s.num_kv_heads, s.head_dim))
        if s.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def kv_weight(self, layer):
        attn = self.layers[layer].self_attn
        weight = torch.cat((attn.k_proj.weight, attn.v_proj.weight))
        bias = None if attn.k_proj.bias is None else torch.cat((attn.k_proj.bias, attn.v_proj.bias))
        return weight, bias

    def finish_k_(self, layer, k):
        if self.spec.qk_norm:
            k.copy_(self.layers[layer].self_attn.k_norm(k))


class LlamaAdapter(SeparateProjections, DecoderAdapter):
    family = "llama"
    MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.decoder = hf_model.model
        self.layers = self.decoder.layers
        super().__init__(hf_model)

    def _make_spec(self) -> ModelSpec:
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        attn0 = self.layers[0].self_attn
        window, types = layer_types(c)
        rope_type, original_max = rope_facts(c)
        return ModelSpec(
            family=self.family,
            model_type=c.model_type,
            **rope_decoder_shape(c, head_dim=head_dim),
            sliding_window=window,
            qkv_bias=attn0.q_proj.bias is not None,
            qk_norm=hasattr(attn0, "q_norm"),
            **self._weight_facts(),
            layer_types=types,
            rope_type=rope_type,
            rope_original_max=original_max,
        )

    def embed(self, token_ids, positions):
        return self.decoder.embed_tokens(token_ids)

    def rope(self, hidden, positions):
        return (rotary_tables(self.decoder.rotary_emb, hidden, positions),) * self.spec.num_layers

    def logits(self, hidden):
        return self.hf_model.lm_head(self.decoder.norm(hidden))

    def attn_output(self, layer, attn, residual):
        return residual + self.layers[layer].self_attn.o_proj(attn)

    def mlp_block(self, layer, hidden):
        block = self.layers[layer]
        return hidden + block.mlp(block.post_attention_layernorm(hidden))
