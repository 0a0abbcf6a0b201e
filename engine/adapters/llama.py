"""Llama-style decoders: Llama 2/3, Mistral (sliding window), Qwen2/2.5 (qkv bias), Qwen3 (q/k norm)."""

from __future__ import annotations

import torch

from engine.adapters.base import DecoderAdapter, ModelSpec


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin (B, T, D): rotate each head at its token's position."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class LlamaAdapter(DecoderAdapter):
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
        window = getattr(c, "sliding_window", None)
        if c.model_type in ("qwen2", "qwen3") and not getattr(c, "use_sliding_window", False):
            window = None
        return ModelSpec(
            family=self.family,
            model_type=c.model_type,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=c.intermediate_size,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
            positional="rope",
            sliding_window=window,
            qkv_bias=attn0.q_proj.bias is not None,
            qk_norm=hasattr(attn0, "q_norm"),
            num_params=sum(p.numel() for p in self.hf_model.parameters()),
            dtype_bytes=next(self.hf_model.parameters()).element_size(),
        )

    def embed(self, token_ids, positions):
        return self.decoder.embed_tokens(token_ids)

    def rope(self, hidden, positions):
        return self.decoder.rotary_emb(hidden, positions)

    def logits(self, hidden):
        return self.hf_model.lm_head(self.decoder.norm(hidden))

    def attn_input(self, layer, hidden):
        return self.layers[layer].input_layernorm(hidden)

    def project_q(self, layer, x, rope):
        attn = self.layers[layer].self_attn
        q = attn.q_proj(x).unflatten(-1, (self.spec.num_heads, self.spec.head_dim))
        if self.spec.qk_norm:
            q = attn.q_norm(q)
        return apply_rope(q, *rope)

    def project_kv(self, layer, x, rope):
        attn = self.layers[layer].self_attn
        shape = (self.spec.num_kv_heads, self.spec.head_dim)
        k = attn.k_proj(x).unflatten(-1, shape)
        v = attn.v_proj(x).unflatten(-1, shape)
        if self.spec.qk_norm:
            k = attn.k_norm(k)
        return apply_rope(k, *rope), v

    def finish_k_(self, layer, k):
        if self.spec.qk_norm:
            k.copy_(self.layers[layer].self_attn.k_norm(k))

    def attn_output(self, layer, attn, residual):
        return residual + self.layers[layer].self_attn.o_proj(attn)

    def mlp_block(self, layer, hidden):
        block = self.layers[layer]
        return hidden + block.mlp(block.post_attention_layernorm(hidden))
