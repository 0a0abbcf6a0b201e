"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seeded generator.

Nothing here waits for the GPU: no `.item()`, no boolean indexing, no `torch.multinomial` (whose input checks read
the probabilities back to the host). The draw is the exponential race torch's own multinomial runs for one sample,
argmax(p / E) with E ~ Exp(1) drawn from the same generator, so a seeded run picks exactly the tokens
`torch.multinomial(p, 1, generator=g)` would, and a CUDA graph can capture the whole function (register the
generator's state with the graph).
"""

from __future__ import annotations

import torch

from engine.settings import SamplingSettings


def make_generator(settings: SamplingSettings, device: torch.device) -> torch.Generator | None:
    if settings.greedy:
        return None
    gen = torch.Generator(device=device)
    if settings.seed is None:
        gen.seed()
    else:
        gen.manual_seed(settings.seed)
    return gen


def sample(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float32 -> next token ids (B,) int64."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    # Shift each row's maximum to 0 first, and keep the divisor a normal number of the logits' dtype: a
    # tiny temperature then sends the other logits to -inf, never the maximum to +inf or 0/0 (NaN).
    temperature = max(settings.temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= settings.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)
