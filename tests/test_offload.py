"""KV offload on the CPU: offloaded decoding gives the GPU-resident tokens for every family, split, chunking and
budget; the synchronous and overlapped schedules agree; recomputed K/V equal the prefill's; failures free memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import GenerationSettings, Generator, load_model
from engine.decode import forward
from engine.errors import InvalidSettingsError, OutOfMemoryError
from engine.decode.kv_cache import KVCache
from engine.offload.runtime import OffloadRuntime
from engine.offload.store import OffloadStore
from engine.offload.placement import plan_for
from engine.presets import TINY_PRESETS
from engine.settings import OffloadSettings

pytestmark = pytest.mark.usefixtures("one_thread", "profile_cache")

LENGTHS = [11, 5, 23, 1, 23]  # mixed, one of a single token, two equal (rows grouped in the write-back)
NEW_TOKENS = 14


@pytest.fixture(scope="module")
def models():
    return {name: load_model(f"synthetic:{name}", device="cpu", dtype="float32") for name in TINY_PRESETS}


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _settings(offload: OffloadSettings, new_tokens: int = NEW_TOKENS) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True, offload=offload)


def _budget_for(model, *, batch: int, slots: float) -> float:
    """GiB that holds `slots` slots of every sequence, all layers."""
    s = model.spec
    return slots * s.num_layers * 2 * batch * s.num_kv_heads * s.head_dim * 4 / 2**30


@pytest.fixture(scope="module")
def resident_runs(models):
    out = {}
    for name, model in models.items():
        prompts = _prompts(model.spec.vocab_size, LENGTHS)
        out[name] = (prompts, Generator(model).generate(prompts, _settings(OffloadSettings()), keep_logits=True))
    return out


OFFLOADS = {
    "cpu split 0, chunk 7": OffloadSettings(placement="cpu", split=0.0, chunk_tokens=7),
    "cpu split 0.5, chunk 3": OffloadSettings(placement="cpu", split=0.5, chunk_tokens=3),
    "cpu split 1, chunk 5": OffloadSettings(placement="cpu", split=1.0, chunk_tokens=5),
    "cpu auto": OffloadSettings(placement="cpu"),
    "hybrid auto budget, split 0.3": OffloadSettings(placement="hybrid", split=0.3, chunk_tokens=4),
}


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("name", list(OFFLOADS))
def test_offloaded_tokens_equal_gpu_resident(models, resident_runs, preset, name):
    model = models[preset]
    prompts, resident = resident_runs[preset]
    engine = Generator(model)
    result = engine.generate(prompts, _settings(OFFLOADS[name]), keep_logits=True)
    assert result.token_ids == resident.token_ids
    worst = max(float((a - b).abs().max()) for a, b in zip(result.logits, resident.logits))
    assert worst < 1e-4, f"logits differ by {worst}"
    plan = engine.plan
    assert plan is not None and plan.placement == OFFLOADS[name].placement
    if OFFLOADS[name].split not in ("auto", 0.0):
        assert plan.act_range[1] > plan.act_range[0], "a manual split above 0 must recompute"


@pytest.mark.parametrize("slots", [9, 17, 1])
def test_hybrid_budget_cutting_mid_sequence(models, resident_runs, slots):
    model = models["tiny-llama3"]
    prompts, resident = resident_runs["tiny-llama3"]
    budget = _budget_for(model, batch=len(prompts), slots=slots + 0.5)
    engine = Generator(model)
    offload = OffloadSettings(placement="hybrid", gpu_kv_budget_gib=budget, split=0.5, chunk_tokens=3)
    result = engine.generate(prompts, _settings(offload))
    assert engine.plan.resident_tokens == slots  # inside the prompts (up to 23 tokens)
    assert result.token_ids == resident.token_ids


def test_synchronous_and_overlapped_schedules_agree_exactly(models):
    model = models["tiny-qwen2"]
    prompts = _prompts(model.spec.vocab_size, [9, 30, 2], seed=3)
    offload = OffloadSettings(placement="hybrid", split=0.6, chunk_tokens=4)
    engine = Generator(model)
    overlapped = engine.generate(prompts, _settings(offload, 20), keep_logits=True)
    engine.offload_overlapped = False
    plain = engine.generate(prompts, _settings(offload, 20), keep_logits=True)
    assert overlapped.token_ids == plain.token_ids
    assert all(torch.equal(a, b) for a, b in zip(overlapped.logits, plain.logits))


def test_many_steps_with_ranges_growing(models):
    """60 steps: the per-step plans move the recompute boundary as the sequences grow; tokens stay equal."""
    model = models["tiny-llama"]
    prompts = _prompts(model.spec.vocab_size, [40, 7, 33], seed=5)
    resident = Generator(model).generate(prompts, _settings(OffloadSettings(), 60))
    engine = Generator(model)
    result = engine.generate(prompts, _settings(OffloadSettings(placement="cpu", split=0.5, chunk_tokens=6), 60))
    assert result.token_ids == resident.token_ids
    assert engine.layers_why == "eager layers (no GPU)"  # CUDA graphs only where there is a GPU
    recompute = [p.recompute_tokens for p in engine.plan.steps]
    assert recompute[0] < recompute[-1] and recompute == sorted(recompute)
    assert engine.plan.kv_range[0] == min(p.recompute_range[1] for p in engine.plan.steps)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_recomputed_kv_equals_the_prefill_kv(models, preset):
    """recompute_kv (fused K/V GEMM into staging, k-norm, RoPE kernel) against the K/V the prefill computed."""
    model = models[preset]
    spec, batch, length = model.spec, 3, 13
    ids = torch.randint(3, spec.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    lens = torch.full((batch,), length)
    cache = KVCache(spec, batch=batch, max_tokens=length + 2, dtype=model.dtype, device=model.device)
    forward.prefill(model.adapter, cache, ids, lens)
    plan = plan_for(spec, OffloadSettings(placement="cpu", split=1.0, chunk_tokens=5), device=model.device,
                    batch=batch, prompt_tokens=length, new_tokens=2)
    store = OffloadStore(spec, plan, dtype=model.dtype, device=model.device)
    runtime = OffloadRuntime(model.adapter, plan, store, forward.decode_attention_torch, prompt_lens=[length] * batch)
    forward.prefill(model.adapter, runtime, ids, lens)
    with torch.inference_mode():
        for layer in range(spec.num_layers):
            chunks = ((0, 5), (5, 10), (10, 12))
            for lo, hi in chunks:
                runtime.load_act(layer, 0, lo, hi)
            runtime.recompute_layer(layer, 0, chunks)
            staged = store.staged_segment(0, 12)
            want_k, want_v = cache.layer(layer, 12)
            assert staged.start == 0
            torch.testing.assert_close(staged.k, want_k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(staged.v, want_v, rtol=1e-5, atol=1e-5)
    runtime.release()


def test_store_is_sized_by_the_plan_ranges(models):
    model = models["tiny-llama"]
    spec = model.spec
    plan = plan_for(spec, OffloadSettings(placement="cpu", split=0.5), device=model.device, batch=2,
                    prompt_tokens=20, new_tokens=5)
    store = OffloadStore(spec, plan, dtype=model.dtype, device=model.device)
    assert store.host_act.shape == (spec.num_layers, plan.act_range[1] - plan.act_range[0], 2, spec.hidden_size)
    assert store.host_kv.shape[1] == plan.kv_range[1] - plan.kv_range[0]
    assert store.stage_kv.shape[:3] == (2, 25, 2)
    store.release()
    assert not hasattr(store, "host_kv") and not hasattr(store, "stage_kv")
    store.release()  # twice is fine


def test_host_memory_shortfall_is_refused_before_allocating(models, monkeypatch):
    import engine.memory

    model = models["tiny-llama"]
    monkeypatch.setattr(engine.memory, "available_bytes", lambda device: 1000)
    with pytest.raises(OutOfMemoryError, match=r"K/V for batch \d+ x \d+ tokens .*of host memory.*choose another "
                                               r"placement \('hybrid'"):
        Generator(model).generate([[5, 6, 7]], _settings(OffloadSettings(placement="cpu"), 4))


def test_store_allocation_failure_releases_and_the_next_run_works(models, resident_runs, monkeypatch):
    model = models["tiny-llama"]
    prompts, resident = resident_runs["tiny-llama"]
    made, released = [], []
    original_host, original_release = OffloadStore._host, OffloadStore.release

    def failing_host(self, shape, dtype):
        if made:
            raise OutOfMemoryError("Could not page-lock 1.00 GiB of host memory for the offloaded KV store")
        made.append(shape)
        return original_host(self, shape, dtype)

    def counting_release(self):
        released.append(True)
        original_release(self)

    monkeypatch.setattr(OffloadStore, "_host", failing_host)
    monkeypatch.setattr(OffloadStore, "release", counting_release)
    with pytest.raises(OutOfMemoryError, match="page-lock"):
        Generator(model).generate(prompts, _settings(OffloadSettings(placement="cpu")))
    assert released, "a failed allocation must release what was allocated"
    monkeypatch.setattr(OffloadStore, "_host", original_host)
    assert Generator(model).generate(prompts, _settings(OffloadSettings(placement="cpu"))).token_ids == resident.token_ids


def test_out_of_memory_mid_run_releases_the_store_and_the_next_run_works(models, resident_runs, monkeypatch):
    model = models["tiny-llama"]
    prompts, resident = resident_runs["tiny-llama"]
    calls, released = [], []
    original_decode, original_release = OffloadRuntime.decode, OffloadRuntime.release

    def failing_decode(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_decode(self, *args)

    def counting_release(self):
        released.append(True)
        original_release(self)

    monkeypatch.setattr(OffloadRuntime, "decode", failing_decode)
    monkeypatch.setattr(OffloadRuntime, "release", counting_release)
    with pytest.raises(OutOfMemoryError, match="memory of this run was released"):
        Generator(model).generate(prompts, _settings(OffloadSettings(placement="cpu", split=0.5)))
    assert released == [True]
    monkeypatch.setattr(OffloadRuntime, "decode", original_decode)
    result = Generator(model).generate(prompts, _settings(OffloadSettings(placement="cpu", split=0.5)))
    assert result.token_ids == resident.token_ids


@pytest.mark.parametrize("kwargs, match", [
    (dict(placement="disk"), "placement must be one of gpu, cpu, hybrid"),
    (dict(placement="cpu", split=-0.1), "split=-0.1 is out of range"),
    (dict(placement="cpu", split=1.5), "split=1.5 is out of range"),
    (dict(placement="cpu", split="half"), "split must be a finite number, got 'half'"),
    (dict(placement="cpu", split=float("nan")), "split must be a finite number"),
    (dict(placement="cpu", gpu_kv_budget_gib=4.0), "only applies to placement 'hybrid'"),
    (dict(placement="hybrid", gpu_kv_budget_gib=-1.0), "gpu_kv_budget_gib=-1.0 is out of range"),
    (dict(placement="hybrid", gpu_kv_budget_gib="lots"), "gpu_kv_budget_gib must be a finite number"),
    (dict(chunk_tokens=0), "chunk_tokens=0 is out of range"),
    (dict(chunk_tokens=2.5), "chunk_tokens must be a whole number"),
])
def test_bad_offload_settings_name_the_fix(kwargs, match):
    with pytest.raises(InvalidSettingsError, match=match):
        OffloadSettings(**kwargs)


def test_settings_carry_offload_and_replace_revalidates():
    settings = GenerationSettings(offload=OffloadSettings(placement="cpu", split=0.25))
    assert settings.offload.offloaded and not settings.offload.auto_split
    with pytest.raises(InvalidSettingsError, match="split=2"):
        dataclasses.replace(settings.offload, split=2)
    with pytest.raises(InvalidSettingsError, match="offload must be an engine.settings.OffloadSettings"):
        GenerationSettings(offload={"placement": "cpu"})


def test_budget_larger_than_the_gpu_is_refused(models, monkeypatch):
    from engine.offload.placement import resident_tokens

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * 2**30, 80 * 2**30))
    spec = models["tiny-llama"].spec
    with pytest.raises(InvalidSettingsError, match="more than the whole GPU"):
        resident_tokens(spec, OffloadSettings(placement="hybrid", gpu_kv_budget_gib=100.0),
                        device=torch.device("cuda"), batch=2, prompt_tokens=10, new_tokens=5)
    tokens, how = resident_tokens(spec, OffloadSettings(placement="hybrid"), device=torch.device("cuda"), batch=2,
                                  prompt_tokens=10, new_tokens=5)
    assert tokens == 15 and "auto" in how  # 60 GiB free holds a tiny model's whole cache
