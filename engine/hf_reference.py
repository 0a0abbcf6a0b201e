"""transformers' own generate on the same weights: the reference for tests and the peer for benches."""

from __future__ import annotations

import copy

import torch


def hf_greedy(hf_model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int = 0):
    """Left-padded batch through `generate` (greedy, EOS off) -> (tokens per prompt, logits per step (B, V))."""
    batch, longest = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for b, ids in enumerate(prompts):
        input_ids[b, longest - len(ids):] = torch.tensor(ids)
        attention_mask[b, longest - len(ids):] = 1
    config = copy.deepcopy(hf_model.generation_config)
    # An id past the vocabulary never matches, so EOS is off (None would fall back to the model's).
    config.eos_token_id = hf_model.config.vocab_size
    config.pad_token_id = pad_id
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    config.output_logits = True
    config.return_dict_in_generate = True
    device = next(hf_model.parameters()).device
    with torch.no_grad():
        out = hf_model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=config)
    tokens = out.sequences[:, longest:].tolist()
    return tokens, [step.float().cpu() for step in out.logits]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
