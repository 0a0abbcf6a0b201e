"""OPT decoders: learned positions (offset 2), LayerNorm, biases everywhere, ReLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.adapters.base import DecoderAdapter, ModelSpec


class OPTAdapter(DecoderAdapter):
    family = "opt"
    MODEL_TYPES = ("opt",)

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.decoder = hf_model.model.decoder
        self.layers = self.decoder.layers
        super().__init__(hf_model)
        self.pre_norm = bool(self.config.do_layer_norm_before)

    def _make_spec(self) -> ModelSpec:
        c = self.config
        return ModelSpec(
            family=self.family,
            model_type=c.model_type,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_attention_heads,
            head_dim=c.hidden_size // c.num_attention_heads,
            intermediate_size=c.ffn_dim,
            vocab_size=c.vocab_size,
            max_positions=c.max_position_embeddings,
            positional="learned",
            sliding_window=None,
            qkv_bias=self.layers[0].self_attn.q_proj.bias is not None,
            qk_norm=False,
            **self._weight_facts(),
        )

    def embed(self, token_ids, positions):
        h = self.decoder.embed_tokens(token_ids)
        if self.decoder.project_in is not None:
            h = self.decoder.project_in(h)
        table = self.decoder.embed_positions
        return h + F.embedding(positions + table.offset, table.weight)

    def logits(self, hidden):
        if self.decoder.final_layer_norm is not None:
            hidden = self.decoder.final_layer_norm(hidden)
        if self.decoder.project_out is not None:
            hidden = self.decoder.project_out(hidden)
        return self.hf_model.lm_head(hidden)

    def attn_input(self, layer, hidden):
        block = self.layers[layer]
        return block.self_attn_layer_norm(hidden) if self.pre_norm else hidden

    def project_qkv(self, layer, x, rope):
        attn, s = self.layers[layer].self_attn, self.spec
        shape = (s.num_kv_heads, s.head_dim)
        q = attn.q_proj(x).unflatten(-1, (s.num_heads, s.head_dim))
        return q, attn.k_proj(x).unflatten(-1, shape), attn.v_proj(x).unflatten(-1, shape)

    def kv_weight(self, layer):
        attn = self.layers[layer].self_attn
        bias = None if attn.k_proj.bias is None else torch.cat((attn.k_proj.bias, attn.v_proj.bias))
        return torch.cat((attn.k_proj.weight, attn.v_proj.weight)), bias

    def attn_output(self, layer, attn, residual):
        block = self.layers[layer]
        hidden = residual + block.self_attn.out_proj(attn)
        return hidden if self.pre_norm else block.self_attn_layer_norm(hidden)

    def mlp_block(self, layer, hidden):
        block = self.layers[layer]
        x = block.final_layer_norm(hidden) if self.pre_norm else hidden
        hidden = hidden + block.fc2(block.activation_fn(block.fc1(x)))
        return hidden if self.pre_norm else block.final_layer_norm(hidden)
