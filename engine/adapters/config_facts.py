"""Facts every family reads off its transformers config the same way: the decoder's shape, attention type per
layer, and RoPE.

Unsupported settings are refused here, when the model loads, never mid-run.
"""

from __future__ import annotations

from engine.adapters.base import LAYER_TYPES
from engine.errors import UnsupportedArchitectureError

# RoPE types whose frequencies transformers changes with the longest position seen (dynamic NTK, LongRoPE):
# a token's K is rotated with the frequencies in force when it was computed, so K/V recomputed later past the
# original context would be rotated anew, differently. The scheduler keeps recomputation off there.
POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_decoder_shape(config, *, head_dim: int) -> dict:
    """The ModelSpec fields a RoPE decoder's config names alike in every family that has one (Llama, Qwen, Mistral,
    Gemma, Phi-3): layers, widths, heads (K/V heads default to the query heads, as transformers reads them)."""
    return dict(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                num_heads=config.num_attention_heads,
                num_kv_heads=config.num_key_value_heads or config.num_attention_heads, head_dim=head_dim,
                intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
                max_positions=config.max_position_embeddings, positional="rope")


def layer_types(config) -> tuple[int | None, tuple[str, ...]]:
    """-> (the sliding window, or None if no layer slides; per-layer types, or () when every layer is alike)."""
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if not types:
        return window, ()
    types = tuple(types)
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedArchitectureError(
            f"{config.model_type}: attention layer types {', '.join(unknown)} are not supported (KV Lab runs "
            f"{' and '.join(LAYER_TYPES)} layers): load a model without them.")
    if len(types) != config.num_hidden_layers:
        raise UnsupportedArchitectureError(
            f"{config.model_type}: config.layer_types lists {len(types)} layers but the model has "
            f"{config.num_hidden_layers}: fix config.json.")
    if "sliding_attention" not in types:
        return None, types
    if window is None:
        raise UnsupportedArchitectureError(
            f"{config.model_type}: config.layer_types has sliding layers but sliding_window is not set: fix config.json.")
    return int(window), types


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """transformers 5's rope_parameters (per layer type for Gemma 3), falling back to rope_scaling."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    return dict(params)


def rope_facts(config) -> tuple[str, int | None]:
    """-> (the RoPE type, e.g. 'default', 'llama3', 'yarn'; the original context of a position-dependent type).

    Several types at once (Gemma 3's per layer type) report the position-dependent one if any."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    groups = [p for p in params.values() if isinstance(p, dict)] or [params]
    found = [(p.get("rope_type") or p.get("type") or "default", p) for p in groups]
    for rope_type, p in found:
        if rope_type in POSITION_DEPENDENT_ROPE:
            original = p.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None) or config.max_position_embeddings
            return rope_type, int(original)
    return found[0][0], None
