"""The engine's decode loop against transformers' generate, on the same weights, on CPU in fp32."""

import pytest
import torch

from engine import TINY_PRESETS, GenerationSettings, Generator, load_model
from engine.hf_reference import hf_greedy, rel_err


@pytest.fixture(scope="module", params=TINY_PRESETS)
def model(request):
    return load_model(f"synthetic:{request.param}", device="cpu", dtype="float32")


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("lengths", [[7], [5, 17, 11, 1], [30, 30]])
def test_greedy_tokens_and_logits_match_transformers(model, lengths):
    # Sliding-window presets need sequences past the window (24) to test the window at all.
    new_tokens = 20
    prompts = _prompts(model.spec.vocab_size, lengths, seed=sum(lengths))
    ours = Generator(model).generate(prompts, GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True),
                                     keep_logits=True)
    ref_tokens, ref_logits = hf_greedy(model.hf_model, prompts, max_new_tokens=new_tokens)
    assert ours.token_ids == ref_tokens
    for step, (mine, ref) in enumerate(zip(ours.logits, ref_logits)):
        assert rel_err(mine, ref) <= 1e-4, f"step {step}: relative logits error {rel_err(mine, ref):.2e}"


def test_sliding_window_really_cuts():
    """The tiny Mistral's window (24) must change the result once sequences pass it."""
    model = load_model("synthetic:tiny-mistral", device="cpu")
    assert model.spec.sliding_window == 24
    prompts = _prompts(model.spec.vocab_size, [40], seed=3)
    settings = GenerationSettings(max_new_tokens=4, ignore_eos=True)
    windowed = Generator(model).generate(prompts, settings, keep_logits=True).logits[0]
    object.__setattr__(model.adapter.spec, "sliding_window", None)
    try:
        full = Generator(model).generate(prompts, settings, keep_logits=True).logits[0]
    finally:
        object.__setattr__(model.adapter.spec, "sliding_window", 24)
    assert rel_err(windowed, full) > 1e-3


def test_hub_id_loads_from_the_local_cache_offline(tmp_path, monkeypatch):
    """A hub id found in the local Hugging Face cache loads with no network (HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants as hub_constants

    source = load_model("synthetic:tiny-qwen2", device="cpu")
    snapshot = tmp_path / "models--kvlab-test--tiny-qwen2" / "snapshots" / ("0" * 40)
    source.hf_model.save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("kvlab-test/tiny-qwen2", device="cpu")
    assert loaded.source == "kvlab-test/tiny-qwen2" and loaded.spec.qkv_bias
    prompts = _prompts(loaded.spec.vocab_size, [9, 4], seed=5)
    settings = GenerationSettings(max_new_tokens=6, ignore_eos=True)
    assert Generator(loaded).generate(prompts, settings).token_ids == Generator(source).generate(prompts, settings).token_ids
