"""Requests that cannot fit in memory fail with a message before anything is allocated; the next run works."""

from __future__ import annotations

import pytest

import engine.memory
from engine import GenerationSettings, Generator, OutOfMemoryError, load_model
from engine.decode.kv_cache import KVCache
from engine.memory import HEADROOM, available_bytes, check_fits


def test_available_bytes_reads_this_machine():
    import torch

    free = available_bytes(torch.device("cpu"))
    assert free is None or free > 0


@pytest.mark.parametrize("source", ["synthetic:tiny-llama", "demo"])
def test_weights_that_do_not_fit_are_refused_before_loading(monkeypatch, source):
    monkeypatch.setattr(engine.memory, "available_bytes", lambda device: 1 << 10)  # 1 KiB free
    with pytest.raises(OutOfMemoryError, match=r"GiB of host memory but only 0\.00 GiB is free.*smaller"):
        load_model(source, device="cpu")
    monkeypatch.undo()
    assert load_model(source, device="cpu").spec.num_layers > 0


def test_full_size_preset_in_fp32_is_refused_where_memory_is_short(monkeypatch):
    monkeypatch.setattr(engine.memory, "available_bytes", lambda device: 24 << 30)  # a 24 GiB machine
    with pytest.raises(OutOfMemoryError, match="synthetic:llama-2-7b in float32 needs 25.10 GiB"):
        load_model("synthetic:llama-2-7b", device="cpu")


def test_kv_cache_that_does_not_fit_is_refused_and_the_model_stays_usable(monkeypatch, tiny):
    need = KVCache.bytes_needed(tiny.spec, batch=4, max_tokens=300 + 8, dtype_bytes=4)
    monkeypatch.setattr(engine.memory, "available_bytes", lambda device: int(need / HEADROOM) - 1)
    prompts = [[5] * 300] * 4
    with pytest.raises(OutOfMemoryError, match=r"K/V for batch 4 x 308 tokens .* all on cpu .*host memory.*at batch 4, "
                                               r"prompts of \d+ tokens would. Lower the batch"):
        Generator(tiny).generate(prompts, GenerationSettings(max_new_tokens=8))
    result = Generator(tiny).generate([[5] * 30], GenerationSettings(max_new_tokens=8, ignore_eos=True))
    assert len(result.token_ids[0]) == 8


def test_check_fits_passes_when_free_memory_is_unknown(monkeypatch):
    import torch

    monkeypatch.setattr(engine.memory, "available_bytes", lambda device: None)
    check_fits(1 << 60, torch.device("cpu"), what="anything", fix="nothing")  # no reading: no refusal
