"""Sampling without a host sync: the exponential race draws exactly the tokens torch.multinomial draws from the same
seeded generator, for every kind of cut; nothing in `sample` reads a tensor back to the host."""

import pytest
import torch

from engine.sampling import make_generator, sample
from engine.settings import SamplingSettings


def _multinomial_sample(logits, settings, generator):
    """engine.sampling.sample as it was, drawing with torch.multinomial (which syncs on a GPU)."""
    temperature = max(settings.temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= settings.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)[:, 0]


SETTINGS = [SamplingSettings(temperature=1.0, seed=3), SamplingSettings(temperature=0.7, top_k=20, seed=4),
            SamplingSettings(temperature=1.3, top_p=0.8, seed=5), SamplingSettings(temperature=0.5, top_k=5, top_p=0.5,
                                                                                   seed=6)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["plain", "top-k", "top-p", "both"])
def test_sample_draws_what_multinomial_draws(settings):
    logits = torch.randn(16, 384, generator=torch.Generator().manual_seed(1)) * 4
    ours, theirs = make_generator(settings, torch.device("cpu")), make_generator(settings, torch.device("cpu"))
    for _ in range(5):  # the generators stay in step across draws
        assert torch.equal(sample(logits, settings, ours), _multinomial_sample(logits, settings, theirs))


def test_sample_never_reads_back_to_the_host(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a host read-back inside sample()")

    monkeypatch.setattr(torch, "multinomial", refuse)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    logits = torch.randn(4, 100)
    for settings in SETTINGS + [SamplingSettings()]:
        out = sample(logits, settings, make_generator(settings, torch.device("cpu")))
        assert out.shape == (4,) and out.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sample_does_not_synchronise_the_gpu():
    logits = torch.randn(8, 32000, device="cuda")
    settings = SamplingSettings(temperature=0.8, top_k=50, top_p=0.9, seed=1)
    gen = make_generator(settings, torch.device("cuda"))
    sample(logits, settings, gen)  # warm-up: kernels loaded outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(logits, settings, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
