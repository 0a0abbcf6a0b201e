"""settings.compile: the decode step through torch.compile (inductor's C++ backend on CPU) against eager."""

import os

# The Triton case runs the kernel in the interpreter, which triton picks when the kernel module is first
# imported: set this before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import gc  # noqa: E402
import weakref  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from engine import GenerationSettings, Generator, load_model, presets  # noqa: E402
from engine import generator  # noqa: E402
from engine.decode import compiled as compiled_decode  # noqa: E402
from engine.errors import CompileError, InvalidSettingsError  # noqa: E402
from engine.hf_reference import rel_err  # noqa: E402

# A Llama with head dim 64, the smallest the Triton kernel takes (the tiny presets have 16 and 32).
TINY_D64 = dict(presets.PRESETS["tiny-llama3"], hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                num_hidden_layers=2)


@pytest.fixture(autouse=True, scope="module")
def _fast_inductor():
    # Two C++ compile workers: with a cold inductor cache this file took ~55 s on 2 cores, ~100 s with one.
    with torch._inductor.config.patch(compile_threads=2):
        yield


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def _assert_same(compiled, eager) -> None:
    assert compiled.token_ids == eager.token_ids
    for step, (mine, ref) in enumerate(zip(compiled.logits, eager.logits)):
        assert rel_err(mine, ref) <= 1e-4, f"step {step}: relative logits error {rel_err(mine, ref):.2e}"


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "tiny-opt"])
def test_compiled_decode_matches_eager_and_compiles_once(preset):
    model = load_model(f"synthetic:{preset}", device="cpu", dtype="float32")
    engine = Generator(model)
    lengths, new_tokens = [5, 17, 11, 1], 12
    eager_settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    compiled_settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True, compile=True)
    for run, seed in enumerate((1, 2)):  # the second run: new prompts and a new cache of the same shape
        prompts = _prompts(model.spec.vocab_size, lengths, seed=seed)
        eager = engine.generate(prompts, eager_settings, keep_logits=True)
        before = _graphs_compiled()
        compiled = engine.generate(prompts, compiled_settings, keep_logits=True)
        # One graph for the whole step (fullgraph) on the first run, none on the second.
        assert _graphs_compiled() - before == (1 if run == 0 else 0), engine.compile_why
        assert engine.compile_why.startswith("decode step compiled" if run == 0 else "reused"), engine.compile_why
        _assert_same(compiled, eager)


def test_triton_attention_runs_inside_the_compiled_step(monkeypatch):
    from kernels.decode_attention import _interpreting

    if not _interpreting():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    monkeypatch.setitem(presets.PRESETS, "tiny-llama-d64", TINY_D64)
    model = load_model("synthetic:tiny-llama-d64", device="cpu", dtype="float32")
    engine = Generator(model)
    prompts = _prompts(model.spec.vocab_size, [6, 3], seed=3)
    settings = GenerationSettings(max_new_tokens=6, ignore_eos=True, attention="triton")
    eager = engine.generate(prompts, settings, keep_logits=True)
    before = _graphs_compiled()
    compiled = engine.generate(prompts, GenerationSettings(max_new_tokens=6, ignore_eos=True, attention="triton",
                                                           compile=True), keep_logits=True)
    assert _graphs_compiled() - before == 1  # the kernel is one opaque op, not a graph break
    assert engine.attention_why.startswith("Triton")
    _assert_same(compiled, eager)


def test_decode_attention_op_passes_opcheck():
    from engine.decode.backend import decode_attention_op
    from kernels.decode_attention import _interpreting

    if not _interpreting():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, generator=gen)
    k, v = (torch.randn(2, 2, 24, 64, generator=gen) for _ in range(2))
    seq_lens = torch.tensor([24, 7], dtype=torch.int32)
    args = (q, k, v, seq_lens, 0.125, None, None, "off", 1, None, None)
    # Schema, fake (meta) implementation against the real one, and tracing through AOTAutograd.
    torch.library.opcheck(decode_attention_op, args, test_utils=("test_schema", "test_faketensor",
                                                                 "test_aot_dispatch_static"))


def test_compile_failure_is_an_engine_error_and_frees_the_cache(monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler in this test")

    caches = []

    class TrackedCache(generator.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(weakref.ref(self.k))

    monkeypatch.setattr(compiled_decode, "BACKEND", broken_backend)
    monkeypatch.setattr(generator, "KVCache", TrackedCache)
    model = load_model("synthetic:tiny-llama", device="cpu", dtype="float32")
    engine = Generator(model)
    prompts = _prompts(model.spec.vocab_size, [4, 2], seed=4)
    with pytest.raises(CompileError, match="compile=False") as failure:
        engine.generate(prompts, GenerationSettings(max_new_tokens=4, compile=True))
    assert "no C++ compiler in this test" in str(failure.value)
    gc.collect()
    assert caches and all(ref() is None for ref in caches), "the failed run's KV cache is still alive"
    assert not engine._compiled  # a step that failed to compile is not kept
    # The process and the Generator carry on: the same run without compiling works.
    result = engine.generate(prompts, GenerationSettings(max_new_tokens=4, ignore_eos=True))
    assert all(len(t) == 4 for t in result.token_ids)


def test_compile_setting_is_validated():
    with pytest.raises(InvalidSettingsError, match="compile must be True or False"):
        GenerationSettings(compile="yes")
    assert GenerationSettings().compile is False


def test_many_shapes_do_not_hit_dynamo_recompile_limit(monkeypatch):
    # Dynamo keeps compiled entries per code object and, with fullgraph, fails hard past recompile_limit
    # (8): every cache shape must get a code object of its own. The eager backend keeps this quick.
    monkeypatch.setattr(compiled_decode, "BACKEND", "eager")
    model = load_model("synthetic:tiny-llama", device="cpu", dtype="float32")
    engine = Generator(model)
    limit = torch._dynamo.config.recompile_limit
    for new_tokens in range(2, limit + 4):  # a new cache length, so a new compiled step, every run
        engine.generate([[5, 6, 7]], GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True, compile=True))
        assert engine.compile_why.startswith("decode step compiled"), engine.compile_why
    assert len(engine._compiled) == generator.MAX_COMPILED_STEPS  # older steps were dropped
