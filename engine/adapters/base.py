"""What the engine needs from a model family, one layer at a time.

An adapter wraps a loaded transformers model and exposes the pieces of a decoder layer as plain tensor
functions. It knows nothing about caches, offload or kernels: the engine's forward passes compose
these pieces with its own KV cache and attention. Tensors are (B, T, ...) with T tokens per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts about a model that the scheduler, the UI and the benches need (no tensors)."""

    family: str  # "llama" (Llama/Mistral/Qwen2/Qwen3) or "opt"
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
    sliding_window: int | None
    qkv_bias: bool
    qk_norm: bool
    num_params: int
    dtype_bytes: int

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

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) each (B, T, head_dim) for rotary families; None for learned positions."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) final hidden state -> (..., vocab) logits (final norm included)."""
        raise NotImplementedError

    # -- per-layer pieces --------------------------------------------------------------------
    def attn_input(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The attention input activations X (post-norm): what K and V are recomputed from."""
        raise NotImplementedError

    def project_q(self, layer: int, x: torch.Tensor, rope) -> torch.Tensor:
        """X (B, T, hidden) -> Q (B, T, Hq, D), with bias, q-norm and RoPE applied."""
        raise NotImplementedError

    def project_kv(self, layer: int, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """X (B, T, hidden) -> K, V (B, T, Hkv, D), with bias, k-norm and RoPE at the tokens' positions."""
        raise NotImplementedError

    def kv_projections(self, layer: int) -> tuple[torch.nn.Linear, torch.nn.Linear]:
        """The K and V projections of a layer: KV recomputation runs them as one GEMM over many tokens."""
        attn = self.layers[layer].self_attn
        return attn.k_proj, attn.v_proj

    def finish_k_(self, layer: int, k: torch.Tensor) -> None:
        """What a family applies to K after its projection and before RoPE (Qwen3's k-norm), in place on
        k (..., Hkv, D). Most families have nothing to do."""

    def attn_output(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Attention result (B, T, Hq*D) -> hidden state after the output projection and residual."""
        raise NotImplementedError

    def mlp_block(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Norm, MLP and residual: hidden -> hidden."""
        raise NotImplementedError

    def _make_spec(self) -> ModelSpec:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def attention_scale(self) -> float:
        return self.spec.head_dim**-0.5
