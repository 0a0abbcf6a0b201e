"""Helpers for tests that build transformers models from configs, save them as checkpoints and compare the
engine with transformers' own generate on them (tests/test_families.py, tests/test_property_configs.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from engine.hf_reference import rel_err

LOGITS_TOLERANCE = 1e-4  # relative, over a step's (B, vocab) logits, as tests/test_exactness.py measures
# A greedy choice between two logits closer than this (relative to the step's largest) is a tie that fp32 rounding
# may break either way: the runs are compared up to it and no further.
TIE_MARGIN = 1e-4


@torch.no_grad()
def randomize_(model: torch.nn.Module, *, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Random weights with every path exercised: matrices N(0, std); 1-D parameters (norm scales, biases) moved
    off their initial value (1 or 0) by N(0, 0.1), so biases are non-zero and norm weights matter. Buffers (RoPE
    tables, Gemma's embedding scale) keep what transformers computed from the config."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():  # tied weights appear once
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype)
        if param.dim() >= 2:
            param.copy_(noise * std)
        else:
            param.add_(noise * 0.1)
    return model.eval()


def build(config, *, seed: int, std: float = 0.2) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "eager"} if config.model_type == "gemma2" else {}
    return randomize_(AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32, **kwargs),
                      seed=seed, std=std)


def save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@torch.no_grad()
def hf_greedy(hf_model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int = 0):
    """transformers' generate, greedy, left-padded, EOS off -> (tokens per prompt, logits per step (B, vocab)).

    engine.hf_reference.hf_greedy does the same but reads config.vocab_size, which a multimodal config (Gemma 3's)
    keeps in its text config."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    for b, ids in enumerate(prompts):
        input_ids[b, longest - len(ids):] = torch.tensor(ids)
        mask[b, longest - len(ids):] = 1
    config = copy.deepcopy(hf_model.generation_config)
    config.eos_token_id = hf_model.config.get_text_config().vocab_size  # never produced: EOS off
    config.pad_token_id = pad_id
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    config.do_sample = False
    config.output_logits = True
    config.return_dict_in_generate = True
    out = hf_model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    return out.sequences[:, longest:].tolist(), [step.float() for step in out.logits]


def compare_runs(ours_tokens, ours_logits, ref_tokens, ref_logits) -> str | None:
    """None when the engine's run equals transformers': the same tokens and every step's logits within
    LOGITS_TOLERANCE. Two runs may part at a near-tie of transformers' own logits (both choices are right in fp32):
    they are compared up to that step. Otherwise -> what differs."""
    steps = len(ref_logits)
    part = next((s for s in range(steps) if any(o[s] != r[s] for o, r in zip(ours_tokens, ref_tokens))), steps)
    for step in range(part + 1 if part < steps else steps):
        err = rel_err(ours_logits[step], ref_logits[step])
        if err > LOGITS_TOLERANCE:
            return f"step {step}: relative logits error {err:.2e} > {LOGITS_TOLERANCE:.0e}"
    if part < steps:
        ref = ref_logits[part]
        for b, (o, r) in enumerate(zip(ours_tokens, ref_tokens)):
            if o[part] != r[part]:
                gap = float(ref[b, r[part]] - ref[b, o[part]])
                scale = float(ref[b].abs().max())
                if gap > TIE_MARGIN * scale:
                    return (f"step {part}, sequence {b}: token {o[part]} where transformers chose {r[part]} (logit gap "
                            f"{gap:.3g} of {scale:.3g}: not a tie)")
    return None


def run_both(loaded, prompts: list[list[int]], *, new_tokens: int, settings=None, generator=None) -> str | None:
    """The engine (settings, default greedy and GPU-resident; `generator`, default a new one) against transformers on
    the loaded model's weights."""
    from engine import GenerationSettings, Generator

    settings = settings or GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    ours = (generator or Generator(loaded)).generate(prompts, settings, keep_logits=True)
    ref_tokens, ref_logits = hf_greedy(loaded.hf_model, prompts, max_new_tokens=new_tokens)
    return compare_runs(ours.token_ids, ours.logits, ref_tokens, ref_logits)


def random_prompts(vocab: int, lengths: list[int], *, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
