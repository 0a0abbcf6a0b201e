"""Gemma 2/3's fast adapter: the Llama family's fused projections and kernels over Gemma's sandwich of (1 + weight)
RMSNorms, a GELU-tanh MLP, Gemma 3's (1 + weight) q/k norms and soft-capped logits.

A Gemma layer norms each block's output before the residual add and its input after it:

    s = r + post_attention_norm(o_proj(attn));   x_mlp = pre_feedforward_norm(s)
    t = s + post_feedforward_norm(down(...));    x_next = input_norm_{l+1}(t)

Each line is two launches here (a norm; an add + norm, handed over to the next call as in engine/fast/llama.py).
"""

from __future__ import annotations

from engine.fast.llama import FusedLlamaAdapter
from engine.fast.ops import ACTIVATIONS, add_norm


class FusedGemmaAdapter(FusedLlamaAdapter):
    family = "gemma"
    QK_NORM_UNIT_OFFSET = True

    def __init__(self, plain, **kwargs) -> None:
        super().__init__(plain, **kwargs)
        config = plain.text_config
        self.act = ACTIVATIONS.get(getattr(config, "hidden_activation", None) or config.hidden_act, "")

    @staticmethod
    def _act_fn(mlp):
        return mlp.act_fn

    def _norm(self, x, residual, norm):
        return add_norm(self.policy, x, residual, norm, unit_offset=True)

    def logits(self, hidden):
        from engine.adapters.gemma import soft_cap

        logits = self.lm_head(self._norm(hidden, None, self.decoder.norm)[1], policy=self.policy, plan=self.plan)
        cap = self.spec.final_softcap
        return logits if cap is None else soft_cap(logits, cap)

    def attn_input(self, layer, hidden):
        normed = self._take("attn", layer, hidden)
        return self._norm(hidden, None, self.layers[layer].input_layernorm)[1] if normed is None else normed

    def attn_output(self, layer, attn, residual):
        block = self.layers[layer]
        out = self.o[layer](attn, policy=self.policy, plan=self.plan)
        out = self._norm(out, None, block.post_attention_layernorm)[1]
        total, normed = self._norm(out, residual, block.pre_feedforward_layernorm)
        self._give("mlp", layer, total, normed)
        return total

    def mlp_block(self, layer, hidden):
        block = self.layers[layer]
        normed = self._take("mlp", layer, hidden)
        if normed is None:
            normed = self._norm(hidden, None, block.pre_feedforward_layernorm)[1]
        act = self.gate_up[layer](normed, policy=self.policy, plan=self.plan, act=self.act, act_fn=block.mlp.act_fn)
        out = self._norm(self.down[layer](act, policy=self.policy, plan=self.plan), None,
                         block.post_feedforward_layernorm)[1]
        if layer + 1 == self.spec.num_layers:
            return hidden + out
        total, x_next = self._norm(out, hidden, self.layers[layer + 1].input_layernorm)
        self._give("attn", layer + 1, total, x_next)
        return total
