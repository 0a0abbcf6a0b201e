"""The fast adapter of the Llama family (Llama, Mistral, Qwen2, Qwen3) and of Phi-3/Phi-4 (the same layer with its
projections fused in the checkpoint already, and partial rotary): the plain adapter's pieces over fused weights and
kernels, with the same interface and the same numbers.

Per decode layer it launches: one residual-add + RMSNorm (fused into the previous block's end), one q/k/v GEMM, one
RoPE (+ Qwen3's q/k norm) in place on its output that also writes the new K/V into a GPU cache
(`project_qkv_storing`: the two scatters a layer it replaces were launches of their own), then after attention one
o_proj GEMM, one add + norm, one gate/up GEMM with SiLU(gate) * up in its epilogue (or cuBLAS + one act kernel, as
the GEMM plan says) and one down GEMM: ~8 kernels where the plain adapter runs ~40.

Fusing the residual add with the next norm crosses the adapter's calls: attn_output(l) returns s = r + o and also
computes norm(s), which mlp_block(l, s) then takes instead of norming again; mlp_block(l) likewise hands
attn_input(l + 1) its input. The hand-over is taken only by the very tensor it was made for (identity), for the
next call only (it is dropped by any other call), per thread; so a caller that passes something else, or calls in
another order (prefill's slices, the offload runtime's separately captured halves), gets the unfused computation.
A CUDA graph captures the hand-over as the kernels that made it, in the order the step runs them. A caller must not
modify a returned hidden state in place before passing it back. Under torch.compile nothing is handed over and the
pieces are plain torch ops over the fused weights (inductor fuses them itself).

With `fold_norm` (off by default) the add + norm launches go too, where the GEMM plan runs both neighbouring GEMMs
on the skinny kernel (bf16 and fp32; fp16 keeps the norm kernel): o_proj and down add the residual in their
epilogue and also write h * w and each row's sums of squares per column block, and what they hand over is a
kernels.skinny_gemm.FoldedNorm, which gate/up and the next layer's q/k/v take as their input, applying rstd in
their epilogue. The q/k/v side is taken only through `project_qkv_storing_from_hidden` (the decode layer's
GPU-resident path, which needs nothing but q, k, v); `attn_input` norms the sum itself for every other caller, since
they read the normed tensor (an offloaded layer's store keeps it for recomputation). In bf16 that norm rounds the
q/k/v input twice where the fold rounds it once, so resident and offloaded runs then part in their last bits: the
reason the fold is opt-in (tests/test_fast_adapter.py, the bf16 placement test).
"""

from __future__ import annotations

import threading

import torch

from engine.adapters.base import DecoderAdapter
from engine.adapters.llama import apply_rope
from engine.fast.ops import ACTIVATIONS, KernelPolicy, Projection, add_norm, norm_eps
from engine.fast.plan import GemmPlan, gemm_plan
from engine.fast.weights import fuse_linears


class _HandOver(threading.local):
    """The normed activations one call leaves for the next, or with fold_norm the kernels.skinny_gemm.FoldedNorm the
    next GEMM applies itself: for (kind, layer) and the `hidden` tensor itself."""

    kind: str | None = None
    layer: int = -1
    hidden: torch.Tensor | None = None
    normed: object = None  # torch.Tensor | FoldedNorm | None


class FusedLlamaAdapter(DecoderAdapter):
    family = "llama"
    QK_NORM_UNIT_OFFSET = False  # Gemma 3's q/k norms scale by (1 + weight)

    def __init__(self, plain: DecoderAdapter, *, kernels: str = "auto", plan: GemmPlan | None = None,
                 pdl: bool = False, weights_ahead: int = 0, fold_norm: bool = False) -> None:
        # Not DecoderAdapter.__init__: the spec is the plain adapter's (same model, same shapes, same parameters).
        self.plain = plain
        self.hf_model, self.config, self.spec = plain.hf_model, plain.config, plain.spec
        self.decoder, self.layers = plain.decoder, plain.layers
        self.policy = KernelPolicy(kernels, pdl=pdl, weights_ahead=weights_ahead, fold_norm=fold_norm)
        device = next(plain.hf_model.parameters()).device
        self.plan = plan if plan is not None else gemm_plan(device)
        self.act = ACTIVATIONS.get(getattr(self.config, "hidden_act", "silu"), "")
        self.qkv, self.o, self.gate_up, self.down = [], [], [], []
        for block in self.layers:
            attn, mlp = block.self_attn, block.mlp
            self.qkv.append(Projection(*fuse_linears(self._qkv_linears(attn))))
            self.o.append(Projection(attn.o_proj.weight, attn.o_proj.bias))
            self.gate_up.append(Projection(*fuse_linears(self._gate_up_linears(mlp)), gated=True))
            self.down.append(Projection(mlp.down_proj.weight, mlp.down_proj.bias))
        head = self.hf_model.lm_head
        self.lm_head = Projection(head.weight, head.bias)
        self._hand_over = _HandOver()

    # -- what differs between the families ---------------------------------------------------------------------
    @staticmethod
    def _qkv_linears(attn) -> list[torch.nn.Linear]:
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    @staticmethod
    def _gate_up_linears(mlp) -> list[torch.nn.Linear]:
        return [mlp.gate_proj, mlp.up_proj]

    @staticmethod
    def _act_fn(mlp):
        return mlp.act_fn

    # -- the hand-over between calls ---------------------------------------------------------------------------
    def _peek(self, kind: str, layer: int, hidden: torch.Tensor):
        """What the hand-over holds for (kind, layer) and this very `hidden`, left in place; None if it is another's."""
        h = self._hand_over
        return h.normed if h.kind == kind and h.layer == layer and h.hidden is hidden else None

    def _take(self, kind: str, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if torch.compiler.is_compiling():
            return None
        normed = self._peek(kind, layer, hidden)
        h = self._hand_over
        h.kind, h.hidden, h.normed = None, None, None
        return normed

    def _give(self, kind: str, layer: int, hidden: torch.Tensor, normed: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():
            h = self._hand_over
            h.kind, h.layer, h.hidden, h.normed = kind, layer, hidden, normed

    # -- whole-model pieces --------------------------------------------------------------------------------------
    def embed(self, token_ids, positions):
        return self.plain.embed(token_ids, positions)

    def rope(self, hidden, positions):
        return self.plain.rope(hidden, positions)

    def logits(self, hidden):
        normed = add_norm(self.policy, hidden, None, self.decoder.norm)[1]
        return self.lm_head(normed, policy=self.policy, plan=self.plan)

    # -- per-layer pieces ----------------------------------------------------------------------------------------
    def attn_input(self, layer, hidden):
        normed = self._take("attn", layer, hidden)
        if normed is None or not isinstance(normed, torch.Tensor):  # a FoldedNorm: this caller needs the tensor
            normed = add_norm(self.policy, hidden, None, self.layers[layer].input_layernorm)[1]
        return normed

    def project_qkv(self, layer, x, rope):
        return self._project_qkv(layer, x, rope)

    def project_qkv_storing(self, layer, x, rope, positions, k_cache, v_cache):
        if not self._stores(x, rope, k_cache):
            return None
        batch = x.shape[0]
        return self._project_qkv(layer, x, rope, store=dict(k_cache=k_cache[:batch], v_cache=v_cache[:batch],
                                                             positions=positions))

    def project_qkv_storing_from_hidden(self, layer, hidden, rope, positions, k_cache, v_cache):
        handed = self._peek("attn", layer, hidden)
        folded = handed is not None and not isinstance(handed, torch.Tensor)  # a FoldedNorm from mlp_block
        if not folded or not self._stores(hidden, rope, k_cache):  # (_stores is False under torch.compile)
            return None  # the hand-over stays for attn_input
        norm = self._take("attn", layer, hidden)
        batch = hidden.shape[0]
        return self._project_qkv(layer, hidden, rope, store=dict(k_cache=k_cache[:batch], v_cache=v_cache[:batch],
                                                                  positions=positions), norm=norm)

    def _stores(self, x, rope, k_cache) -> bool:
        """Whether the RoPE launch can write this step's K/V into k_cache itself."""
        return (rope is not None and x.dim() == 3 and x.shape[1] == 1 and self.policy.triton(x)
                and k_cache.dtype == x.dtype and k_cache.device == x.device)

    def _project_qkv(self, layer, x, rope, store: dict | None = None, norm=None):
        """The fused q/k/v GEMM (norm: a FoldedNorm of x, whose scaled rows it multiplies), then (Triton) one launch
        for the q/k norms, RoPE and, with `store`, the K/V cache write; or the torch ops over the fused output."""
        s, attn = self.spec, self.layers[layer].self_attn
        qkv = self.qkv[layer](x, policy=self.policy, plan=self.plan, norm=norm)
        heads = qkv.unflatten(-1, (s.num_heads + 2 * s.num_kv_heads, s.head_dim))
        q, k, v = heads.split((s.num_heads, s.num_kv_heads, s.num_kv_heads), dim=-2)
        if self.policy.triton(qkv) and qkv.dim() == 3:
            from kernels.rope_qkv import rope_qkv_

            norms = {}
            if s.qk_norm:
                norms = dict(q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight, eps=norm_eps(attn.q_norm),
                             unit_offset=self.QK_NORM_UNIT_OFFSET)
            rope_qkv_(qkv, *rope, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                      pdl=self.policy.pdl, **norms, **(store or {}))
            return q, k, v  # views of qkv, rotated in place
        assert store is None, "the cache write needs the Triton launch"
        if s.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def kv_weight(self, layer):
        q_rows = self.spec.num_heads * self.spec.head_dim
        proj = self.qkv[layer]
        return proj.weight[q_rows:], None if proj.bias is None else proj.bias[q_rows:]

    def finish_k_(self, layer, k):
        self.plain.finish_k_(layer, k)

    def attn_output(self, layer, attn, residual):
        if self._folds(self.o[layer], attn, residual, self.gate_up[layer], act=self.act):
            # the add in o_proj's epilogue, the norm split between it and gate/up: no norm launch of its own
            total, folded = self.o[layer].add_residual(attn, residual, self.layers[layer].post_attention_layernorm,
                                                       policy=self.policy, plan=self.plan)
            self._give("mlp", layer, total, folded)
            return total
        out = self.o[layer](attn, policy=self.policy, plan=self.plan)
        total, normed = add_norm(self.policy, out, residual, self.layers[layer].post_attention_layernorm)
        self._give("mlp", layer, total, normed)
        return total

    def _folds(self, producer: Projection, x, residual, consumer: Projection, act: str = "") -> bool:
        """policy.fold_norm, and both GEMMs run the skinny kernel on these rows (else the norm kernel runs): the
        producer adds `residual` to its output, the consumer norms that sum (it has the residual's shape)."""
        if not self.policy.fold_norm or x.dtype != residual.dtype or not residual.is_contiguous():
            return False  # (runs_skinny is False under torch.compile: no Triton launches there)
        if residual.dtype == torch.float16:  # h * w may overflow fp16's range where the normed h * rstd * w would not
            return False
        return (producer.runs_skinny(x, policy=self.policy, plan=self.plan)
                and consumer.runs_skinny(residual, policy=self.policy, plan=self.plan, act=act))

    def mlp_block(self, layer, hidden):
        block = self.layers[layer]
        normed = self._take("mlp", layer, hidden)
        if normed is not None and not isinstance(normed, torch.Tensor):  # a FoldedNorm from attn_output
            act = self.gate_up[layer](hidden, policy=self.policy, plan=self.plan, act=self.act, norm=normed)
        else:
            if normed is None:
                normed = add_norm(self.policy, hidden, None, block.post_attention_layernorm)[1]
            act = self.gate_up[layer](normed, policy=self.policy, plan=self.plan, act=self.act,
                                      act_fn=self._act_fn(block.mlp))
        if layer + 1 < self.spec.num_layers and self._folds(self.down[layer], act, hidden, self.qkv[layer + 1]):
            # the add in down's epilogue, the next layer's input norm left for its q/k/v GEMM (taken by
            # project_qkv_storing_from_hidden; attn_input norms the sum itself for any other caller)
            total, folded = self.down[layer].add_residual(act, hidden, self.layers[layer + 1].input_layernorm,
                                                          policy=self.policy, plan=self.plan)
            self._give("attn", layer + 1, total, folded)
            return total
        down = self.down[layer](act, policy=self.policy, plan=self.plan)
        if layer + 1 == self.spec.num_layers:
            return hidden + down
        total, x_next = add_norm(self.policy, down, hidden, self.layers[layer + 1].input_layernorm)
        self._give("attn", layer + 1, total, x_next)
        return total


class FusedPhi3Adapter(FusedLlamaAdapter):
    """Phi-3/Phi-4: qkv_proj and gate_up_proj come fused in the checkpoint ([q | k | v], [gate | up]): taken as
    they are."""

    family = "phi3"

    @staticmethod
    def _qkv_linears(attn):
        return [attn.qkv_proj]

    @staticmethod
    def _gate_up_linears(mlp):
        return [mlp.gate_up_proj]

    @staticmethod
    def _act_fn(mlp):
        return mlp.activation_fn
