"""Synthetic presets: real architectures' shapes with random weights, for profiling without downloads.

`synthetic:<name>` loads one. The full-size presets copy the public configs of the named models; the
`tiny-*` presets keep each family's features (GQA, qkv bias, q/k norm, sliding window, learned
positions, soft-capping, per-layer attention and RoPE types, partial rotary, fused projections, RoPE
scaling) at a size the CPU test suite can run in fp32.
"""

from __future__ import annotations

import copy

# model_type -> keyword arguments of the transformers config class.
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    # The 70B Llamas run tensor parallel (engine/parallel): 64 query heads and 8 K/V heads split over 2, 4 or 8 GPUs.
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    # Llama-2-7B stretched to 32K positions by linear RoPE interpolation (x8): an MHA model at long context, where
    # KV recomputation pays.
    "llama-2-7b-32k": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                           max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                           rope_scaling=dict(rope_type="linear", factor=8.0)),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=4096),
    # Qwen2.5's documented long-context setting: YaRN x4 over its 32,768 trained positions.
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
                       tie_word_embeddings=False, use_sliding_window=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     tie_word_embeddings=False, use_sliding_window=False),
    "gemma-2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                       max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                       query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
    # The language model of Gemma 3 12B (text only): five sliding layers (1,024-token window, local RoPE base
    # 10,000) to each full one (global base 1,000,000, linear scaling x8 to 131,072 positions).
    "gemma-3-12b": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262208,
                        max_position_embeddings=131072, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                        sliding_window=1024, hidden_activation="gelu_pytorch_tanh",
                        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(48)],
                        rope_parameters=dict(
                            full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
                            sliding_attention=dict(rope_type="default", rope_theta=10000.0))),
    "phi-4": dict(model_type="phi3", hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=10, vocab_size=100352,
                  max_position_embeddings=16384, original_max_position_embeddings=16384, rms_norm_eps=1e-5,
                  rope_theta=250000.0, tie_word_embeddings=False),
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
    # For tensor parallel over 2 and 4 ranks: 8 query heads over 4 K/V heads, an MLP of 4 x 40 features, and a
    # vocabulary (389) that no world size divides, so the LM head's last rank holds fewer rows.
    "tiny-llama-tp": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=389,
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
    # Llama 3.1's RoPE (llama3 scaling) with its original context cut to 64 so that short tests cross it.
    "tiny-llama3.1": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=1, vocab_size=384,
                          max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=64)),
    "tiny-llama-32k": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, vocab_size=384,
                           max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                           rope_scaling=dict(rope_type="linear", factor=8.0)),
    "tiny-qwen2.5-yarn": dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                              max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128),
                              tie_word_embeddings=False, use_sliding_window=False),
    # Gemma 2: sliding and full layers alternating, a 16-token window, both soft-caps low enough to bite on random
    # weights, a query scale that is not head_dim's, 32-dim heads on a 64-wide model.
    "tiny-gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=384,
                        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                        query_pre_attn_scalar=24, sliding_window=16, attn_logit_softcapping=2.0,
                        final_logit_softcapping=5.0, hidden_activation="gelu_pytorch_tanh"),
    # Gemma 3: q/k norms, two sliding layers (window 16, local RoPE base) to each full one (global base, linear x8).
    "tiny-gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=384,
                        max_position_embeddings=512, rms_norm_eps=1e-6, query_pre_attn_scalar=32,
                        sliding_window=16, hidden_activation="gelu_pytorch_tanh",
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        rope_parameters=dict(
                            full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
                            sliding_attention=dict(rope_type="default", rope_theta=10000.0))),
    # Phi-3/4: fused qkv and gate_up projections, RoPE over 3/4 of each head (Phi-4-mini's), LongRoPE past 64
    # positions (the exactness tests stay below it; tests/test_families.py runs past it).
    "tiny-phi3": dict(model_type="phi3", hidden_size=128, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                      max_position_embeddings=512, original_max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, partial_rotary_factor=0.75, tie_word_embeddings=False,
                      rope_scaling=dict(rope_type="longrope", factor=8.0, original_max_position_embeddings=64,
                                        short_factor=[1.0 + 0.05 * i for i in range(12)],
                                        long_factor=[1.0 + 0.5 * i for i in range(12)])),
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

    kwargs = copy.deepcopy(PRESETS[name])  # configs update their nested RoPE dicts in place
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
