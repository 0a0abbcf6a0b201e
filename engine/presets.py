"""Synthetic presets: real architectures' shapes with random weights, for profiling without downloads.

`synthetic:<name>` loads one. The full-size presets copy the public configs of the named models; the
`tiny-*` presets keep each family's features (GQA, qkv bias, q/k norm, sliding window, learned
positions) at a size the CPU test suite can run in fp32.
"""

from __future__ import annotations

# model_type -> keyword arguments of the transformers config class.
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=4096),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False, use_sliding_window=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=False, use_sliding_window=False),
    "opt-6.7b": dict(model_type="opt", hidden_size=4096, ffn_dim=16384, num_hidden_layers=32,
                     num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048,
                     word_embed_proj_dim=4096, do_layer_norm_before=True),
    "opt-13b": dict(model_type="opt", hidden_size=5120, ffn_dim=20480, num_hidden_layers=40,
                    num_attention_heads=40, vocab_size=50272, max_position_embeddings=2048,
                    word_embed_proj_dim=5120, do_layer_norm_before=True),
    # Tiny versions, one per family (and per feature the engine must handle).
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=384,
                       max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0),
    "tiny-llama3": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=384,
                        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0),
    "tiny-mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                         max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                         sliding_window=24),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                       max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False, use_sliding_window=False),
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=384,
                       max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False, use_sliding_window=False),
    "tiny-opt": dict(model_type="opt", hidden_size=64, ffn_dim=160, num_hidden_layers=3,
                     num_attention_heads=4, vocab_size=384, max_position_embeddings=512,
                     word_embed_proj_dim=64, do_layer_norm_before=True),
}

TINY_PRESETS = tuple(name for name in PRESETS if name.startswith("tiny-"))
FULL_PRESETS = tuple(name for name in PRESETS if not name.startswith("tiny-"))

# Token ids the synthetic models treat as special (their tokenizer is byte-level).
SYNTHETIC_BOS_ID, SYNTHETIC_EOS_ID, SYNTHETIC_PAD_ID = 1, 2, 0


def preset_config(name: str):
    """The transformers config object of a preset (raises KeyError for an unknown name)."""
    from transformers import AutoConfig

    kwargs = dict(PRESETS[name])
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("bos_token_id", SYNTHETIC_BOS_ID)
    kwargs.setdefault("eos_token_id", SYNTHETIC_EOS_ID)
    kwargs.setdefault("pad_token_id", SYNTHETIC_PAD_ID)
    config = AutoConfig.for_model(model_type, **kwargs)
    # Tiny presets are for exactness tests: a larger init spreads the logits so that fp32 rounding
    # never decides an argmax between near-equal candidates.
    if name.startswith("tiny-"):
        for attr in ("initializer_range", "init_std"):
            if hasattr(config, attr):
                setattr(config, attr, 0.2)
    return config
