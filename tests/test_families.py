"""The families added after Llama and OPT, feature by feature, against transformers on CPU in fp32: Gemma 2
(soft-capping, alternating windows), Gemma 3 (per-layer-type RoPE, q/k norm, the multimodal checkpoint's language
model), Phi-3/4 (fused projections, partial rotary, LongRoPE's long factors); and the split K/V recomputation
relies on (kv_weight, finish_k_, RoPE) for every tiny preset."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import GenerationSettings, Generator, KVLabError, load_model
from engine.adapters.llama import apply_rope
from engine.hf_reference import rel_err
from engine.presets import TINY_PRESETS
from hf_models import build, random_prompts, run_both, save


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def tiny(name: str):
    return load_model(f"synthetic:{name}", device="cpu", dtype="float32")


def test_gemma2_soft_capping_bites_and_matches_transformers():
    model = tiny("tiny-gemma2")
    assert (model.spec.attn_softcap, model.spec.final_softcap) == (2.0, 5.0)
    assert model.hf_model.config._attn_implementation == "eager"  # the transformers attention that soft-caps
    prompts = random_prompts(model.spec.vocab_size, [23, 9], seed=4)
    assert run_both(model, prompts, new_tokens=6) is None
    settings = GenerationSettings(max_new_tokens=2, ignore_eos=True)
    capped = Generator(model).generate(prompts, settings, keep_logits=True).logits[0]
    spec = model.adapter.spec
    for field in ("attn_softcap", "final_softcap"):  # each cap changes the answer on its own
        model.adapter.spec = dataclasses.replace(spec, **{field: None})
        try:
            uncapped = Generator(model).generate(prompts, settings, keep_logits=True).logits[0]
        finally:
            model.adapter.spec = spec
        assert rel_err(uncapped, capped) > 1e-2, field
    assert float(capped.abs().max()) <= 5.0


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_gemma_windows_alternate_and_cut(name):
    model = tiny(name)
    windows = model.spec.windows
    assert 16 in windows and None in windows  # sliding and full layers both
    prompts = random_prompts(model.spec.vocab_size, [40, 3], seed=9)
    assert run_both(model, prompts, new_tokens=8) is None
    settings = GenerationSettings(max_new_tokens=2, ignore_eos=True)
    windowed = Generator(model).generate(prompts, settings, keep_logits=True).logits[0]
    spec = model.adapter.spec
    model.adapter.spec = dataclasses.replace(spec, layer_types=(), sliding_window=None)
    try:
        full = Generator(model).generate(prompts, settings, keep_logits=True).logits[0]
    finally:
        model.adapter.spec = spec
    assert rel_err(windowed, full) > 1e-3


def test_gemma3_rope_tables_per_layer_type():
    model = tiny("tiny-gemma3")
    assert model.spec.qk_norm and model.spec.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    hidden = torch.zeros(1, 5, model.spec.hidden_size)
    ropes = model.adapter.rope(hidden, torch.arange(5)[None])
    assert ropes[0] is ropes[1] and ropes[0] is not ropes[2]  # one pair per layer type, shared
    assert not torch.allclose(ropes[0][0], ropes[2][0])  # local base 10,000 vs global 1,000,000 with linear x8
    rotary = model.hf_model.model.rotary_emb
    assert torch.equal(ropes[2][0], rotary(hidden, torch.arange(5)[None], "full_attention")[0])


def _tiny_gemma3_multimodal():
    from transformers import Gemma3Config

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=24, vocab_size=320, max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=20,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters=dict(full_attention=dict(rope_type="linear", factor=4.0, rope_theta=1000000.0),
                                     sliding_attention=dict(rope_type="default", rope_theta=10000.0)))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)


def test_gemma3_multimodal_checkpoint_runs_its_language_model(tmp_path):
    path = save(build(_tiny_gemma3_multimodal(), seed=3), tmp_path / "gemma3-mm")
    model = load_model(str(path), device="cpu", dtype="float32")
    assert type(model.hf_model).__name__ == "Gemma3ForConditionalGeneration"
    assert model.spec.model_type == "gemma3" and model.spec.head_dim == 24 and model.spec.vocab_size == 320
    assert any("language model only" in note for note in model.notes), model.notes
    prompts = random_prompts(320, [19, 4, 11], seed=1)
    assert run_both(model, prompts, new_tokens=8) is None


def test_phi3_partial_rotary_and_fused_projections():
    model = tiny("tiny-phi3")
    spec = model.spec
    assert spec.head_dim == 32 and spec.rotary_dim == 24 and spec.rope_type == "longrope"
    assert spec.rope_original_max == 64
    assert any("LongRoPE" in note for note in model.notes)
    weight, bias = model.adapter.kv_weight(0)
    fused = model.hf_model.model.layers[0].self_attn.qkv_proj.weight
    assert weight.data_ptr() == fused[spec.num_heads * spec.head_dim:].data_ptr()  # a view, no copy
    assert bias is None


@pytest.mark.parametrize("lengths", [[70, 66], [100]])
def test_phi3_long_factors_past_the_original_context(lengths):
    """Prompts past original_max_position_embeddings (64) run with LongRoPE's long factors from the first token, as
    transformers does."""
    model = tiny("tiny-phi3")
    prompts = random_prompts(model.spec.vocab_size, lengths, seed=len(lengths))
    assert run_both(model, prompts, new_tokens=6) is None
    hidden = torch.zeros(1, 101, model.spec.hidden_size)
    positions = torch.arange(101)[None]
    long = model.adapter.rope(hidden, positions)[0][0]  # 101 positions > 64: the long factors
    short = model.adapter.rope(hidden[:, :11], positions[:, :11])[0][0]  # 11 positions: the short ones
    assert long.shape[-1] == 24 and not torch.allclose(short[0, 10], long[0, 10])


def test_phi3_run_crossing_the_original_context_is_refused():
    """transformers' Phi-3 recomputes the whole cache with the long factors once a sequence passes
    original_max_position_embeddings; the engine keeps K as computed, so it refuses such a run up front, and runs
    that stay on one side of the switch match transformers (test_families' exactness cases)."""
    model = tiny("tiny-phi3")
    original = model.spec.rope_original_max
    prompts = random_prompts(model.spec.vocab_size, [60], seed=2)
    with pytest.raises(KVLabError, match=f"crosses the model's original context of {original} positions.*LongRoPE"):
        Generator(model).generate(prompts, GenerationSettings(max_new_tokens=10, ignore_eos=True))
    fits = original - 60 + 1  # the most new tokens that stay below the switch
    assert len(Generator(model).generate(prompts, GenerationSettings(max_new_tokens=fits, ignore_eos=True))
               .token_ids[0]) == fits


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_kv_weight_recomputes_project_qkv_exactly(name):
    """K/V recomputation runs X @ [W_k; W_v]^T (+ bias), finish_k_, then RoPE: it must give project_qkv's K and V."""
    model = tiny(name)
    adapter, spec = model.adapter, model.spec
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, spec.hidden_size, generator=gen)
    positions = torch.arange(7)[None].expand(2, 7)
    ropes = adapter.rope(hidden, positions)
    width = spec.num_kv_heads * spec.head_dim
    for layer in range(spec.num_layers):
        x = adapter.attn_input(layer, hidden)
        _, k, v = adapter.project_qkv(layer, x, ropes[layer])
        weight, bias = adapter.kv_weight(layer)
        assert weight.shape == (2 * width, spec.hidden_size)
        kv = x @ weight.t() + (0 if bias is None else bias)
        k2 = kv[..., :width].unflatten(-1, (spec.num_kv_heads, spec.head_dim)).contiguous()
        adapter.finish_k_(layer, k2)
        if ropes[layer] is not None:
            k2 = apply_rope(k2, *ropes[layer])
        v2 = kv[..., width:].unflatten(-1, (spec.num_kv_heads, spec.head_dim))
        torch.testing.assert_close(k2, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v2, v, rtol=1e-5, atol=1e-5)
