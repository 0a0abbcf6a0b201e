"""What a checkpoint directory can get wrong, and what loading it says: no tokenizer files, tokenizer files that
do not load or do not fit the model, tensors the config has no place for, configs the engine cannot run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import KVLabError, ModelLoadError, UnsupportedArchitectureError, load_model
from engine.presets import preset_config
from hf_models import build, random_prompts, run_both, save


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny Qwen2, Qwen3 and OPT checkpoints as save_pretrained writes them: config, weights, no tokenizer."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save(build(preset_config(f"tiny-{name}"), seed=1), root / name) for name in ("qwen2", "qwen3", "opt")}


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "opt"])
def test_directory_without_tokenizer_files_reads_bytes_and_says_so(checkpoints, name):
    model = load_model(str(checkpoints[name]), device="cpu")
    assert model.tokenizer.name.startswith("bytes")
    assert model.tokenizer.decode(model.tokenizer.encode("héllo")) == "héllo"  # texts no longer come back empty
    (note,) = [n for n in model.notes if "tokenizer" in n]
    assert "no tokenizer files" in note and "bytes" in note and note in model.card()["notes"]


def test_tokenizer_files_that_fail_to_load_are_named_on_the_card(checkpoints, tmp_path):
    path = tmp_path / "broken"
    path.mkdir()
    for item in checkpoints["qwen2"].iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    model = load_model(str(path), device="cpu")
    (note,) = [n for n in model.card()["notes"] if "tokenizer" in n.lower()]
    assert note.startswith("TOKENIZER NOT LOADED") and "tokenizer.json" in note and "failed to load" in note
    assert model.tokenizer.name.startswith("bytes")


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused_for_bytes(checkpoints, tmp_path):
    path = tmp_path / "other-tokenizer"
    path.mkdir()
    for item in checkpoints["qwen3"].iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    words = "Hello , world ! The answer is 42 .".split() + [f"w{i}" for i in range(500)]
    word_tokenizer(words[::-1]).save_pretrained(path)  # the probe's words get ids past the model's 384
    model = load_model(str(path), device="cpu")
    (note,) = [n for n in model.notes if "tokenizer" in n.lower()]
    assert "past the model's 384-token vocabulary" in note


def test_a_fitting_tokenizer_loads_without_a_note(checkpoints, tmp_path):
    path = tmp_path / "with-tokenizer"
    path.mkdir()
    for item in checkpoints["opt"].iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    word_tokenizer("Hello , world ! The answer is 42 . to be or not".split()).save_pretrained(path)
    model = load_model(str(path), device="cpu")
    assert not [n for n in model.notes if "tokenizer" in n.lower()]
    assert model.tokenizer.encode("to be or not")[-4:] == [12, 13, 14, 15]


def _with_weights(source, path, change):
    path.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            (path / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(source / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_extra_tensors_outside_the_model_are_counted_in_a_note(checkpoints, tmp_path):
    def add(tensors):
        tensors["model.layers.7.mlp.up_proj.weight"] = torch.zeros(4, 4)  # a layer past num_hidden_layers
        tensors["vision_tower.patch.weight"] = torch.zeros(2, 2)

    model = load_model(str(_with_weights(checkpoints["qwen2"], tmp_path / "extra", add)), device="cpu")
    (note,) = [n for n in model.notes if "not used by this model" in n]
    assert note.startswith("2 tensors") and ("layers.7" in note or "vision_tower" in note)
    assert run_both(model, random_prompts(384, [9, 3], seed=0), new_tokens=4) is None  # still runs right


def test_tensors_the_config_switched_off_are_refused(tmp_path):
    config = preset_config("tiny-llama")
    config.attention_bias = True
    source = save(build(config, seed=2), tmp_path / "biased")
    described = json.loads((source / "config.json").read_text())
    described["attention_bias"] = False  # the config no longer describes the weights: biases would be dropped
    (source / "config.json").write_text(json.dumps(described))
    with pytest.raises(ModelLoadError, match=r"does not match the checkpoint") as err:
        load_model(str(source), device="cpu")
    assert "_proj.bias" in str(err.value) and "12 tensors" in str(err.value)


def test_a_checkpoint_of_mostly_foreign_tensors_is_refused(checkpoints, tmp_path):
    def add(tensors):
        for key in list(tensors):
            tensors[f"text_encoder.{key}"] = tensors[key].clone()
            tensors[f"vision_encoder.{key}"] = tensors[key].clone()

    path = _with_weights(checkpoints["opt"], tmp_path / "foreign", add)
    with pytest.raises(ModelLoadError, match="another architecture"):
        load_model(str(path), device="cpu")


@pytest.mark.parametrize("case", ["bidirectional gemma", "unknown layer type", "gemma partial rotary"])
def test_unsupported_configs_are_refused_when_the_model_loads(tmp_path, case):
    if case == "bidirectional gemma":
        config = preset_config("tiny-gemma3")
        config.use_bidirectional_attention = True
        expected = "use_bidirectional_attention"
    elif case == "unknown layer type":
        config = preset_config("tiny-qwen2")
        config.layer_types = ["full_attention", "chunked_attention", "full_attention"]
        expected = "chunked_attention"
    else:
        config = preset_config("tiny-gemma2")
        config.rope_parameters = dict(config.rope_parameters, rope_type="linear", factor=2.0, partial_rotary_factor=0.5)
        expected = "partial"
    try:
        path = save(build(config, seed=0), tmp_path / "model")
    except Exception as exc:  # noqa: BLE001 - transformers itself refusing the config is fine too
        pytest.skip(f"transformers refuses this config itself: {exc}")
    with pytest.raises(UnsupportedArchitectureError, match=expected) as err:
        load_model(str(path), device="cpu")
    assert isinstance(err.value, KVLabError) and ("load" in str(err.value) or "fix" in str(err.value)
                                                  or "remove" in str(err.value))


def test_a_config_transformers_rejects_is_a_load_error(tmp_path):
    """transformers 5.24 validates configs with strict dataclasses whose errors are no ValueError: still a KVLabError
    naming config.json (5.17 accepts the config and refuses the weights that no longer fit it)."""
    config = preset_config("tiny-llama")
    path = save(build(config, seed=0), tmp_path / "odd")
    described = json.loads((path / "config.json").read_text())
    described.update(head_dim=25, hidden_size=100, num_attention_heads=4, num_key_value_heads=4)
    (path / "config.json").write_text(json.dumps(described))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(path), device="cpu")
    assert "config.json" in str(err.value) or "ignore_mismatched_sizes" in str(err.value)


@pytest.mark.parametrize("quantization", [
    {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"},
    {"quant_method": "gptq", "bits": 4, "group_size": 128},
    {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}},
    {"quant_method": "a-method-transformers-skips"},  # loaded as plain Linear over the quantized payload otherwise
], ids=lambda q: q["quant_method"])
def test_a_quantized_checkpoint_is_refused_before_loading(checkpoints, tmp_path, quantization):
    """Quantized checkpoints (the -FP8 / -AWQ / -GPTQ variants of today's models) are refused up front, naming the
    method and the fix: transformers asked for packages (accelerate, optimum) whose install would only have moved the
    failure into the run, and an unknown method loaded the raw payload as weights."""
    path = tmp_path / "quantized"
    path.mkdir()
    for item in checkpoints["qwen3"].iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    described = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**described, "quantization_config": quantization}))
    with pytest.raises(UnsupportedArchitectureError, match="quantized checkpoint") as err:
        load_model(str(path), device="cpu")
    assert repr(quantization["quant_method"]) in str(err.value) and "unquantized checkpoint" in str(err.value)
    assert load_model(str(checkpoints["qwen3"]), device="cpu").adapter is not None  # the plain one still loads


def test_a_quantized_model_built_in_python_is_refused_by_its_adapter():
    from engine.adapters import adapter_for

    model = build(preset_config("tiny-llama"), seed=0)
    model.config.quantization_config = {"quant_method": "fp8"}
    with pytest.raises(UnsupportedArchitectureError, match="'fp8'"):
        adapter_for(model)
