"""Bad input gives a clear KVLabError (the problem and the fix in the message) and the process goes on.

Every case checks three things: the error's type (a KVLabError subclass, never a bare RuntimeError or
KeyError from deep inside torch or transformers), words in the message that name the problem and the
fix, and that a good call right after the failure still works and gives the same result as before it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from engine import (PRESETS, SUPPORTED_MODEL_TYPES, GenerationSettings, Generator, InvalidSettingsError, KVLabError,
                    ModelLoadError, PromptTooLongError, SamplingSettings, UnsupportedArchitectureError, load_model)

GOOD_PROMPTS = [[5, 80, 17, 200], [9, 9]]
GOOD_SETTINGS = GenerationSettings(max_new_tokens=4, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def baseline(tiny):
    """What a good call on `tiny` gives before any failure; a good call after each failure must match it."""
    return Generator(tiny).generate(GOOD_PROMPTS, GOOD_SETTINGS).token_ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny):
    """Real model directories written by save_pretrained: the tiny Llama, and a tiny OPT to steal weights from."""
    root = tmp_path_factory.mktemp("models")
    tiny.hf_model.save_pretrained(root / "good")
    load_model("synthetic:tiny-opt", device="cpu").hf_model.save_pretrained(root / "opt")
    assert (root / "good" / "model.safetensors").is_file() and (root / "good" / "config.json").is_file()
    return root


def expect(error: type[KVLabError], call, *needles: str) -> str:
    """`call()` raises `error` (a KVLabError) whose message holds every needle; returns the message."""
    assert issubclass(error, KVLabError)
    with pytest.raises(KVLabError) as info:
        call()
    exc = info.value
    assert isinstance(exc, error), f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
    message = str(exc)
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in message: {message}"
    assert ": " in message or ". " in message, f"message has no separate fix: {message}"
    return message


def good_generate_still_works(tiny, baseline) -> None:
    assert Generator(tiny).generate(GOOD_PROMPTS, GOOD_SETTINGS).token_ids == baseline


def good_load_still_works(saved, tiny, baseline) -> None:
    reloaded = load_model(str(saved / "good"), device="cpu")
    assert Generator(reloaded).generate(GOOD_PROMPTS, GOOD_SETTINGS).token_ids == baseline
    good_generate_still_works(tiny, baseline)


def variant(saved, tmp_path, change) -> str:
    """A copy of the good model directory with `change(path)` applied."""
    path = tmp_path / "model"
    shutil.copytree(saved / "good", path)
    change(path)
    return str(path)


# --- loading -------------------------------------------------------------------------------------------------


def test_saved_directory_loads_and_matches_the_preset(saved, tiny, baseline):
    """The control: without damage the directory loads and generates what the preset generates."""
    good_load_still_works(saved, tiny, baseline)


def test_missing_path(tmp_path, saved, tiny, baseline):
    missing = tmp_path / "no" / "such-model"
    expect(ModelLoadError, lambda: load_model(str(missing), device="cpu"), str(missing), "does not exist",
           "check the path")
    expect(ModelLoadError, lambda: load_model("./not-here", device="cpu"), "does not exist", "check the path")
    good_load_still_works(saved, tiny, baseline)


def test_path_is_a_file(tmp_path, saved, tiny, baseline):
    weights = saved / "good" / "model.safetensors"
    expect(ModelLoadError, lambda: load_model(str(weights), device="cpu"), "is a file", "directory holding config.json")
    good_load_still_works(saved, tiny, baseline)


def test_directory_without_config(tmp_path, saved, tiny, baseline):
    path = variant(saved, tmp_path, lambda p: (p / "config.json").unlink())
    expect(ModelLoadError, lambda: load_model(path, device="cpu"), "no config.json", "needs config.json")
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.parametrize("content, problem", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2, 3]", "does not hold a JSON object"),
    (b'"llama"', "does not hold a JSON object"),
])
def test_config_is_not_a_json_object(tmp_path, saved, tiny, baseline, content, problem):
    path = variant(saved, tmp_path, lambda p: (p / "config.json").write_bytes(content))
    expect(ModelLoadError, lambda: load_model(path, device="cpu"), "config.json", problem, "restore the file")
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.parametrize("model_type, architectures", [("gpt2", ["GPT2LMHeadModel"]), ("bert", None), (None, None)])
def test_unsupported_architecture_lists_the_supported_ones(tmp_path, saved, tiny, baseline, model_type, architectures):
    def change(path):
        config = json.loads((path / "config.json").read_text())
        config.pop("model_type")
        config.pop("architectures", None)
        if model_type is not None:
            config["model_type"] = model_type
        if architectures is not None:
            config["architectures"] = architectures
        (path / "config.json").write_text(json.dumps(config))

    path = variant(saved, tmp_path, change)
    message = expect(UnsupportedArchitectureError, lambda: load_model(path, device="cpu"), repr(model_type),
                     "not supported", "llama", "opt", "load a model of one of these families")
    assert set(SUPPORTED_MODEL_TYPES) >= {"llama", "opt"}
    for supported in SUPPORTED_MODEL_TYPES:
        assert supported in message
    if architectures:
        assert architectures[0] in message
    good_load_still_works(saved, tiny, baseline)


def test_directory_without_safetensors(tmp_path, saved, tiny, baseline):
    def change(path):
        (path / "model.safetensors").rename(path / "pytorch_model.bin")

    path = variant(saved, tmp_path, change)
    expect(ModelLoadError, lambda: load_model(path, device="cpu"), "no *.safetensors", "save_pretrained")
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.parametrize("size", [0, 7, 4096])
def test_corrupt_safetensors(tmp_path, saved, tiny, baseline, size):
    data = torch.Generator().manual_seed(size)
    noise = bytes(torch.randint(0, 256, (size,), generator=data, dtype=torch.uint8).tolist())
    path = variant(saved, tmp_path, lambda p: (p / "model.safetensors").write_bytes(noise))
    expect(ModelLoadError, lambda: load_model(path, device="cpu"), "model.safetensors", "corrupt", "re-download")
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.parametrize("keep", ["minus-one-byte", "half", "header-only", "inside-header", "eight-bytes"])
def test_truncated_safetensors(tmp_path, saved, tiny, baseline, keep):
    raw = (saved / "good" / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    cut = {"minus-one-byte": len(raw) - 1, "half": len(raw) // 2, "header-only": 8 + header_len,
           "inside-header": 8 + header_len // 2, "eight-bytes": 8}[keep]
    assert cut < len(raw)
    path = variant(saved, tmp_path, lambda p: (p / "model.safetensors").write_bytes(raw[:cut]))
    expect(ModelLoadError, lambda: load_model(path, device="cpu"), "model.safetensors", "truncated", "re-download")
    good_load_still_works(saved, tiny, baseline)


def test_safetensors_of_another_model(tmp_path, saved, tiny, baseline):
    """OPT weights under a Llama config: every Llama tensor is missing."""
    path = variant(saved, tmp_path, lambda p: shutil.copy(saved / "opt" / "model.safetensors", p / "model.safetensors"))
    expect(ModelLoadError, lambda: load_model(path, device="cpu"), "lack", "belongs to another model", "re-download")
    good_load_still_works(saved, tiny, baseline)


def test_safetensors_missing_one_tensor(tmp_path, saved, tiny, baseline):
    from safetensors.torch import load_file, save_file

    def change(path):
        tensors = load_file(path / "model.safetensors")
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    path = variant(saved, tmp_path, change)
    expect(ModelLoadError, lambda: load_model(path, device="cpu"), "lack 1 tensors",
           "model.layers.1.mlp.up_proj.weight", "incomplete", "re-download")
    good_load_still_works(saved, tiny, baseline)


def test_safetensors_with_wrong_shapes(tmp_path, saved, tiny, baseline):
    """Weights of the GQA tiny Llama 3 (k/v projections 4x narrower) under the MHA tiny Llama's config."""
    other = tmp_path / "llama3"
    load_model("synthetic:tiny-llama3", device="cpu").hf_model.save_pretrained(other)
    path = variant(saved, tmp_path, lambda p: shutil.copy(other / "model.safetensors", p / "model.safetensors"))
    expect(ModelLoadError, lambda: load_model(path, device="cpu"), "could not read the model", "re-download")
    good_load_still_works(saved, tiny, baseline)


def test_hub_id_not_cached_offline(monkeypatch, saved, tiny, baseline):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect(ModelLoadError, lambda: load_model("nobody-org/not-a-model", device="cpu"), "'nobody-org/not-a-model'",
           "not in the local hugging face cache", "HF_HUB_OFFLINE", "hf download nobody-org/not-a-model",
           "local directory")
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.parametrize("source", ["org/name--bad", "org/..", "org/-bad-", "bad id/with space", "a/b/c", "org/"])
def test_invalid_hub_id(monkeypatch, saved, tiny, baseline, source):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = expect(ModelLoadError, lambda: load_model(source, device="cpu"), repr(source), "'org/name'")
    assert "does not exist" in message or "nor a valid hub id" in message, message
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.parametrize("name", ["tiny-gpt", "", "TINY-LLAMA", "tiny_llama"])
def test_unknown_synthetic_preset_lists_the_presets(saved, tiny, baseline, name):
    message = expect(ModelLoadError, lambda: load_model(f"synthetic:{name}", device="cpu"),
                     "unknown synthetic preset", "presets:")
    for preset in PRESETS:
        assert preset in message
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.parametrize("source", ["", "   ", "\n\t", None, 7])
def test_empty_source(saved, tiny, baseline, source):
    expect(ModelLoadError, lambda: load_model(source, device="cpu"), "no model given", "local directory",
           "synthetic:<preset>")
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "mps", "meta", 3.5, "cpu cpu"])
def test_bad_device(saved, tiny, baseline, device):
    expect(InvalidSettingsError, lambda: load_model("synthetic:tiny-llama", device=device), "device", "'cpu'")
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu(saved, tiny, baseline):
    expect(InvalidSettingsError, lambda: load_model("synthetic:tiny-llama", device="cuda"), "no CUDA GPU",
           "device='cpu'")
    good_load_still_works(saved, tiny, baseline)


@pytest.mark.parametrize("dtype", ["float8", "int8", "", "fp64", "float16", torch.int8, torch.float64, 3])
def test_bad_dtype(saved, tiny, baseline, dtype):
    expect(InvalidSettingsError, lambda: load_model("synthetic:tiny-llama", device="cpu", dtype=dtype), "dtype",
           "use one of", "float32")
    good_load_still_works(saved, tiny, baseline)


# --- prompts ---------------------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context(tiny, baseline):
    context = tiny.spec.max_positions
    assert context == 512
    generator = Generator(tiny)
    message = expect(PromptTooLongError, lambda: generator.generate(["x" * 600], GOOD_SETTINGS), str(context),
                     "shorten the prompt", "fewer new tokens")
    assert "601 tokens" in message  # BOS + 600 bytes
    # A short prompt with too many new tokens, and the streaming entry point, fail the same way.
    expect(PromptTooLongError, lambda: generator.generate([[5, 6]], GenerationSettings(max_new_tokens=511)),
           "max_new_tokens=511", str(context))
    expect(PromptTooLongError, lambda: next(generator.stream([[5] * 510], GenerationSettings(max_new_tokens=3))),
           "513 positions", str(context))
    assert issubclass(PromptTooLongError, ValueError)
    # Exactly at the limit is allowed.
    at_limit = generator.generate([[5] * 510], GenerationSettings(max_new_tokens=2, ignore_eos=True))
    assert len(at_limit.token_ids[0]) == 2
    good_generate_still_works(tiny, baseline)


@pytest.mark.parametrize("prompts, needles", [
    ([""], ["prompt 0 is empty", "at least one"]),
    (["fine", ""], ["prompt 1 is empty", "at least one"]),
    ([[]], ["prompt 0 is empty", "at least one"]),
    ([], ["non-empty list", "got an empty list", "wrap a single prompt in a list"]),
    ((), ["non-empty list", "got an empty list", "wrap a single prompt in a list"]),
    ("a bare string", ["non-empty list", "got a str", "wrap a single prompt in a list"]),
    (b"bytes", ["non-empty list", "got a bytes", "wrap a single prompt in a list"]),
    (None, ["non-empty list", "got a NoneType", "wrap a single prompt in a list"]),
    ([None], ["prompt 0", "string or a list of token ids", "got NoneType", "pass text, or a list of ints"]),
    ([[5, 6.0]], ["prompt 0", "string or a list of token ids", "holding 6.0 (float)", "pass text, or a list of ints"]),
    ([[5], [True, 5]], ["prompt 1", "string or a list of token ids", "holding True (bool)", "a list of ints"]),
    ([b"To be"], ["prompt 0", "string or a list of token ids", "got bytes", "decode them to text first"]),
])
def test_empty_or_malformed_prompts(tiny, baseline, prompts, needles):
    generator = Generator(tiny)
    expect(InvalidSettingsError, lambda: generator.generate(prompts, GOOD_SETTINGS), *needles)
    expect(InvalidSettingsError, lambda: next(generator.stream(prompts, GOOD_SETTINGS)), *needles)
    good_generate_still_works(tiny, baseline)


@pytest.mark.parametrize("ids", [[[5, 384]], [[-1]], [[3], [10**9]], [[5, 6], [7, 383, 384]]])
def test_token_ids_outside_the_vocabulary(tiny, baseline, ids):
    vocab = tiny.spec.vocab_size
    assert vocab == 384
    bad = next(n for n, seq in enumerate(ids) if any(not 0 <= t < vocab for t in seq))
    first_bad = next(t for t in ids[bad] if not 0 <= t < vocab)
    expect(InvalidSettingsError, lambda: Generator(tiny).generate(ids, GOOD_SETTINGS), f"prompt {bad}",
           f"outside 0..{vocab - 1} (e.g. {first_bad})", "use ids of this model's 384-token vocabulary")
    good_generate_still_works(tiny, baseline)


def test_settings_of_the_wrong_type(tiny, baseline):
    generator = Generator(tiny)
    expect(InvalidSettingsError, lambda: generator.generate(GOOD_PROMPTS, {"max_new_tokens": 4}),
           "GenerationSettings", "GenerationSettings(max_new_tokens=")
    expect(InvalidSettingsError, lambda: GenerationSettings(sampling={"temperature": 1.0}), "sampling",
           "got dict", "build one with SamplingSettings(")
    good_generate_still_works(tiny, baseline)


# --- settings values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needles", [
    (dict(max_new_tokens=0), ["max_new_tokens=0 is out of range", "use a whole number between 1 and"]),
    (dict(max_new_tokens=-5), ["max_new_tokens=-5 is out of range", "use a whole number between 1 and"]),
    (dict(max_new_tokens=10**7), ["max_new_tokens=10000000 is out of range", "between 1 and 1000000"]),
    (dict(max_new_tokens=4.0), ["max_new_tokens must be a whole number", "(float)", "between 1 and"]),
    (dict(max_new_tokens="4"), ["max_new_tokens must be a whole number", "(str)", "between 1 and"]),
    (dict(max_new_tokens=None), ["max_new_tokens must be a whole number", "(NoneType)", "between 1 and"]),
    (dict(max_new_tokens=True), ["max_new_tokens must be a whole number", "(bool)", "between 1 and"]),
    (dict(max_new_tokens=False), ["max_new_tokens must be a whole number", "(bool)", "between 1 and"]),
    (dict(stop_strings="\n"), ["stop_strings", "tuple of non-empty strings", "('\\n\\n',)"]),
    (dict(stop_strings=("",)), ["stop_strings", "non-empty strings"]),
    (dict(stop_strings=("ok", 3)), ["stop_strings", "non-empty strings"]),
])
def test_bad_generation_settings(tiny, baseline, kwargs, needles):
    expect(InvalidSettingsError, lambda: GenerationSettings(**kwargs), *needles)
    assert issubclass(InvalidSettingsError, ValueError)
    # dataclasses.replace validates again: a good settings object cannot be edited into a bad one.
    expect(InvalidSettingsError, lambda: dataclasses.replace(GOOD_SETTINGS, **kwargs), *needles)
    good_generate_still_works(tiny, baseline)


@pytest.mark.parametrize("kwargs, needles", [
    (dict(temperature=-0.5), ["temperature=-0.5 is out of range", "use a number in [0.0, 100.0]", "0 is greedy"]),
    (dict(temperature=-1e-9), ["temperature=-1e-09 is out of range", "[0.0, 100.0]"]),
    (dict(temperature=100.5), ["temperature=100.5 is out of range", "[0.0, 100.0]"]),
    (dict(temperature=float("nan")), ["temperature must be a finite number, got nan", "use a number in [0.0, 100.0]"]),
    (dict(temperature=float("inf")), ["temperature must be a finite number, got inf", "[0.0, 100.0]"]),
    (dict(temperature="0.7"), ["temperature must be a finite number, got '0.7'", "[0.0, 100.0]"]),
    (dict(temperature=True), ["temperature must be a finite number, got True", "[0.0, 100.0]"]),
    (dict(top_p=0), ["top_p=0 is out of range", "use a number in (0.0, 1.0]", "1.0 turns top-p off"]),
    (dict(top_p=0.0), ["top_p=0.0 is out of range", "(0.0, 1.0]"]),
    (dict(top_p=1.0001), ["top_p=1.0001 is out of range", "(0.0, 1.0]"]),
    (dict(top_p=2), ["top_p=2 is out of range", "(0.0, 1.0]"]),
    (dict(top_p=float("nan")), ["top_p must be a finite number", "(0.0, 1.0]"]),
    (dict(top_k=-1), ["top_k=-1 is out of range", "use a whole number of at least 0", "0 turns top-k off"]),
    (dict(top_k=2.5), ["top_k must be a whole number", "(float)", "of at least 0"]),
    (dict(top_k=True), ["top_k must be a whole number", "(bool)"]),
    (dict(seed=-1), ["seed=-1 is out of range", "between 0 and", "None for a fresh random seed"]),
    (dict(seed="42"), ["seed must be a whole number", "(str)", "between 0 and"]),
])
def test_bad_sampling_settings(tiny, baseline, kwargs, needles):
    expect(InvalidSettingsError, lambda: SamplingSettings(**kwargs), *needles)
    expect(InvalidSettingsError, lambda: dataclasses.replace(SamplingSettings(), **kwargs), *needles)
    good_generate_still_works(tiny, baseline)


def test_edge_settings_that_are_valid_run(tiny, baseline):
    """The boundaries the validators let through must generate, not crash further down."""
    generator = Generator(tiny)
    vocab = tiny.spec.vocab_size
    for sampling in (SamplingSettings(temperature=1e-40, seed=0),  # the smallest temperatures: greedy in effect
                     SamplingSettings(temperature=5e-324, seed=0),
                     SamplingSettings(temperature=100.0, seed=0),
                     SamplingSettings(temperature=1.0, top_k=vocab + 10, seed=0),
                     SamplingSettings(temperature=1.0, top_p=1e-12, seed=0)):  # nucleus of one token: greedy
        out = generator.generate(GOOD_PROMPTS, dataclasses.replace(GOOD_SETTINGS, sampling=sampling))
        assert [len(t) for t in out.token_ids] == [4, 4]
        assert all(0 <= t < vocab for seq in out.token_ids for t in seq)
        if sampling.temperature < 1e-30 or sampling.top_p < 1e-6:
            assert out.token_ids == baseline, sampling
    good_generate_still_works(tiny, baseline)


def test_every_error_is_catchable_as_one_type():
    for error in (ModelLoadError, UnsupportedArchitectureError, InvalidSettingsError, PromptTooLongError):
        assert issubclass(error, KVLabError)
