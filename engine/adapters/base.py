"""What the engine needs from a model family, one layer at a time.

An adapter wraps a loaded transformers model and exposes the pieces of a decoder layer as plain tensor
functions. It knows nothing about caches, offload or kernels: the engine's forward passes compose
these pieces with its own KV cache and attention. Tensors are (B, T, ...) with T tokens per sequence.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

LAYER_TYPES = ("full_attention", "sliding_attention")


def _capturing(hidden: torch.Tensor) -> bool:
    # Under torch.compile the question is not traceable (a graph break fails a fullgraph compile); a compiled step
    # is captured after inductor has run, from its generated code, which never calls this module.
    if torch.compiler.is_compiling():
        return False
    return hidden.is_cuda and torch.cuda.is_current_stream_capturing()


def rotary_tables(rotary_emb: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor, *args):
    """`rotary_emb(hidden, positions, *args)` (cos, sin), safe inside a CUDA-graph capture.

    transformers' position-dependent RoPE types (longrope, dynamic) re-choose their frequencies from max(positions)
    on every call, and some of its versions branch on that value in Python: a host sync, which invalidates a capture
    and with it the process's CUDA context. Under capture the rotary module's own forward runs without that update:
    the eager prefill before it has set the frequencies for the run, and the engine captures no step of a run that
    passes the original context (engine/generator.py: `moving_rope`), so they would not change."""
    if _capturing(hidden):
        forward = inspect.unwrap(type(rotary_emb).forward)  # past transformers' dynamic_rope_update and no_grad
        return forward(rotary_emb, hidden, positions, *args)
    return rotary_emb(hidden, positions, *args)


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts about a model that the scheduler, the UI and the benches need (no tensors)."""

    family: str  # "llama" (Llama/Mistral/Qwen2/Qwen3), "gemma" (Gemma 2/3), "phi3" (Phi-3/Phi-4) or "opt"
    model_type: str  # the transformers model_type
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    positional: str  # "rope" or "learned"
    sliding_window: int | None  # the window of the layers that slide (None: no layer does)
    qkv_bias: bool
    qk_norm: bool
    num_params: int
    dtype_bytes: int
    # Per layer "full_attention" or "sliding_attention" (transformers' config.layer_types); empty: every layer
    # slides when sliding_window is set, else every layer is full.
    layer_types: tuple[str, ...] = ()
    query_scale: float | None = None  # softmax scale of q.k; None: head_dim ** -0.5
    attn_softcap: float | None = None  # attention logits s -> cap * tanh(s / cap) (Gemma 2)
    final_softcap: float | None = None  # LM-head logits likewise (Gemma 2); applied by the adapter
    rotary_dim: int | None = None  # dims of each head that RoPE rotates (partial rotary); None: all of them
    rope_type: str = "default"  # transformers' rope_type ("default", "linear", "llama3", "yarn", "dynamic", ...)
    # For RoPE types whose frequencies change with the longest position (dynamic, longrope): the original context
    # past which they do. K/V recomputation must not run past it (engine/adapters/config_facts.py).
    rope_original_max: int | None = None

    def __post_init__(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = set(self.layer_types) - set(LAYER_TYPES)
        if unknown:
            raise ValueError(f"layer types {sorted(unknown)} are not supported (supported: {', '.join(LAYER_TYPES)})")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: it attends to every earlier token)."""
        if self.sliding_window is None:
            return None
        if not self.layer_types:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @property
    def windows(self) -> tuple[int | None, ...]:
        return tuple(self.window(layer) for layer in range(self.num_layers))

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5 if self.query_scale is None else self.query_scale

    @property
    def rotary_dims(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def recompute_blocked(self, max_tokens: int) -> str | None:
        """Why K/V of a run of `max_tokens` positions cannot be recomputed from activations (None: they can)."""
        if self.rope_original_max is not None and max_tokens > self.rope_original_max:
            return (f"{self.rope_type} RoPE changes its frequencies past {self.rope_original_max} positions, so K "
                    f"recomputed later would be rotated differently from the K computed at the time")
        return None

    @property
    def gqa_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def act_bytes_per_token(self) -> int:
        """Attention-input activations of one token, all layers (what KV recomputation ships instead)."""
        return self.num_layers * self.hidden_size * self.dtype_bytes

    @property
    def act_to_kv_ratio(self) -> float:
        """> 1 means shipping activations costs more PCIe bytes than shipping the KV (typical of GQA)."""
        return self.act_bytes_per_token / self.kv_bytes_per_token

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self) | {
            "windows": list(self.windows),
            "attention_scale": self.attention_scale,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "act_bytes_per_token": self.act_bytes_per_token,
            "act_to_kv_ratio": self.act_to_kv_ratio,
            "weight_bytes": self.weight_bytes,
        }


class DecoderAdapter:
    """The per-layer pieces of a causal decoder. Subclasses implement one family each."""

    family: str = ""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.hf_model = hf_model
        self.config = hf_model.config
        self.spec = self._make_spec()

    # -- whole-model pieces ------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and positions -> (B, T, hidden) hidden state entering layer 0."""
        raise NotImplementedError

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
        """Per layer: (cos, sin) each (B, T, rotary_dim) for rotary families, None for learned positions. Layers of
        one kind share one pair (Gemma 3 has one for sliding and one for full layers): callers may dedupe by id."""
        return (None,) * self.spec.num_layers

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) final hidden state -> (..., vocab) logits (final norm and soft-capping included)."""
        raise NotImplementedError

    # -- per-layer pieces --------------------------------------------------------------------
    def attn_input(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The attention input activations X (post-norm): what K and V are recomputed from."""
        raise NotImplementedError

    def project_qkv(self, layer: int, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """X (B, T, hidden) -> Q (B, T, Hq, D), K, V (B, T, Hkv, D): biases, q/k norms and RoPE (this layer's
        (cos, sin), or None) applied at the tokens' positions."""
        raise NotImplementedError

    def project_qkv_storing(self, layer: int, x: torch.Tensor, rope, positions: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """project_qkv of one new token per sequence (x (B, 1, hidden)) that also writes its K and V into
        k_cache/v_cache (B' >= B, Hkv, S, D) at positions (B,), or None where the adapter cannot do both at once
        (the caller then stores what project_qkv returns). The plain adapters cannot."""
        return None

    def project_qkv_storing_from_hidden(self, layer: int, hidden: torch.Tensor, rope, positions: torch.Tensor,
                                        k_cache: torch.Tensor, v_cache: torch.Tensor
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """attn_input then project_qkv_storing in one go, from the layer's input hidden (B, 1, hidden), where the
        adapter need not materialise the normed input (its norm folded into the q/k/v GEMM); None: the caller runs
        attn_input and the projection itself. Only for a caller that needs nothing but q, k, v (the normed input
        is never returned). The plain adapters cannot."""
        return None

    def kv_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[W_k; W_v] (2 * Hkv * D, hidden) and its bias (or None): K/V recomputation runs X @ W^T as one GEMM over
        many tokens, then finish_k_ and RoPE. May be a fresh tensor: callers copy it into their own buffer."""
        raise NotImplementedError

    def finish_k_(self, layer: int, k: torch.Tensor) -> None:
        """What a family applies to K after its projection and before RoPE (a k-norm), in place on k (..., Hkv, D).
        Most families have nothing to do."""

    def attn_output(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Attention result (B, T, Hq*D) -> hidden state after the output projection (and any post-norm) and
        the residual."""
        raise NotImplementedError

    def mlp_block(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Norms, MLP and residual: hidden -> hidden."""
        raise NotImplementedError

    def _make_spec(self) -> ModelSpec:
        raise NotImplementedError

    def _weight_facts(self) -> dict:
        """ModelSpec's num_params and dtype_bytes, read off the loaded weights."""
        return {"num_params": sum(p.numel() for p in self.hf_model.parameters()),
                "dtype_bytes": next(self.hf_model.parameters()).element_size()}

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def attention_scale(self) -> float:
        return self.spec.attention_scale
