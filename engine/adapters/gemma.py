"""Gemma 2 and Gemma 3 decoders: alternating sliding/full layers, (1 + weight) RMSNorms before and after both
the attention and the MLP, embeddings scaled by sqrt(hidden), a GELU-tanh MLP, a query scale of its own
(query_pre_attn_scalar), soft-capped logits (Gemma 2), q/k norms and per-layer-type RoPE (Gemma 3).

Every piece is transformers' own module (norms, rotary embeddings, MLP, the scaled embedding); this file is the
glue. `gemma3` is the multimodal checkpoint (Gemma3ForConditionalGeneration): its language model runs, its
vision tower is loaded with the weights but never used.
"""

from __future__ import annotations

import torch

from engine.adapters.base import DecoderAdapter, ModelSpec, rotary_tables
from engine.adapters.config_facts import layer_types, rope_decoder_shape, rope_facts
from engine.adapters.llama import SeparateProjections
from engine.errors import UnsupportedArchitectureError


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), in transformers' order of operations."""
    return torch.tanh(x / cap) * cap


class GemmaAdapter(SeparateProjections, DecoderAdapter):
    family = "gemma"
    MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")
    # transformers 5.17 runs Gemma 2 through SDPA by default, which drops the attention soft-capping without a word
    # (5.24 refuses SDPA for it): the reference model must run eager attention to compute what Gemma 2 computes.
    HF_ATTENTION = {"gemma2": "eager"}

    def __init__(self, hf_model: torch.nn.Module) -> None:
        multimodal = hf_model.config.model_type == "gemma3"
        self.text_config = hf_model.config.text_config if multimodal else hf_model.config
        self.decoder = hf_model.model.language_model if multimodal else hf_model.model
        self.layers = self.decoder.layers
        self.notes: list[str] = []
        if multimodal:
            vision = sum(p.numel() for p in hf_model.model.vision_tower.parameters())
            vision += sum(p.numel() for p in hf_model.model.multi_modal_projector.parameters())
            self.notes.append(f"Gemma 3 multimodal checkpoint: KV Lab runs its language model only (text in, text "
                              f"out); the vision tower's {vision / 1e6:.0f}M parameters are loaded but unused")
        super().__init__(hf_model)

    def _make_spec(self) -> ModelSpec:
        c, model_type = self.text_config, self.config.model_type
        if getattr(c, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError(
                f"{model_type}: use_bidirectional_attention=True (an embedding model, not a causal LM) is not "
                "supported: KV Lab decodes causal language models; load a generative Gemma checkpoint.")
        window, types = layer_types(c)
        rope_type, original_max = rope_facts(c)
        head_dim = c.head_dim
        rotary_emb = self.decoder.rotary_emb
        # Gemma 3's rotary module keeps one table per layer type (rope_type is then a dict); Gemma 2's has one.
        self._rope_types = sorted(rotary_emb.rope_type) if isinstance(rotary_emb.rope_type, dict) else []
        missing = sorted(set(types) - set(self._rope_types)) if self._rope_types else []
        if missing:
            raise UnsupportedArchitectureError(
                f"{model_type}: config.rope_parameters has no entry for the {', '.join(missing)} layers: fix config.json.")
        rotary = {len(self._inv_freq(t)) * 2 for t in (self._rope_types or [None])}
        if rotary != {head_dim}:
            raise UnsupportedArchitectureError(
                f"{model_type}: RoPE over {sorted(rotary)} of the {head_dim} dims of each head (partial rotary) is not "
                "something transformers' Gemma runs: remove partial_rotary_factor from config.json.")
        attn0 = self.layers[0].self_attn
        # transformers' Gemma 3 attention passes no soft-cap to its kernels, and its multimodal head applies none
        # to the logits: a config that sets them is run as transformers runs it, and the card says so.
        attn_cap = c.attn_logit_softcapping if model_type == "gemma2" else None
        final_cap = c.final_logit_softcapping if model_type != "gemma3" else None
        for name, value, used in (("attn_logit_softcapping", c.attn_logit_softcapping, attn_cap),
                                  ("final_logit_softcapping", c.final_logit_softcapping, final_cap)):
            if value is not None and used is None:
                self.notes.append(f"config sets {name}={value}, which transformers' {type(self.hf_model).__name__} "
                                  "does not apply; neither does KV Lab")
        return ModelSpec(
            family=self.family,
            model_type=model_type,
            **rope_decoder_shape(c, head_dim=head_dim),
            sliding_window=window,
            qkv_bias=attn0.q_proj.bias is not None,
            qk_norm=hasattr(attn0, "q_norm"),
            **self._weight_facts(),
            layer_types=types,
            query_scale=float(c.query_pre_attn_scalar) ** -0.5,
            attn_softcap=attn_cap,
            final_softcap=final_cap,
            rope_type=rope_type,
            rope_original_max=original_max,
        )

    def _inv_freq(self, layer_type: str | None) -> torch.Tensor:
        rotary = self.decoder.rotary_emb
        return rotary.inv_freq if layer_type is None else getattr(rotary, f"{layer_type}_inv_freq")

    def embed(self, token_ids, positions):
        return self.decoder.embed_tokens(token_ids)  # scaled by sqrt(hidden) in the weights' dtype, as transformers does

    def rope(self, hidden, positions):
        if not self._rope_types:  # Gemma 2: one table for every layer
            return (rotary_tables(self.decoder.rotary_emb, hidden, positions),) * self.spec.num_layers
        tables = {t: rotary_tables(self.decoder.rotary_emb, hidden, positions, t) for t in self._rope_types}
        return tuple(tables[t] for t in self.text_config.layer_types)

    def logits(self, hidden):
        logits = self.hf_model.lm_head(self.decoder.norm(hidden))
        cap = self.spec.final_softcap
        return logits if cap is None else soft_cap(logits, cap)

    def attn_output(self, layer, attn, residual):
        block = self.layers[layer]
        return residual + block.post_attention_layernorm(block.self_attn.o_proj(attn))

    def mlp_block(self, layer, hidden):
        block = self.layers[layer]
        return hidden + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(hidden)))
