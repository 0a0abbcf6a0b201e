"""The embedded demo model (assets/demo-model) loads offline through transformers and writes Shakespeare.

It is what `python app.py` opens on a machine with no GPU and no network, so these checks run on CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
MAX_WEIGHT_BYTES = 16_000_000


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32, local_files_only=True).eval()


def test_directory_holds_a_hf_model_and_its_provenance():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "train.py", "train.log", "README.md"):
        assert (DEMO_DIR / name).is_file(), name


def test_weights_fit_the_size_budget():
    size = (DEMO_DIR / "model.safetensors").stat().st_size
    assert 12_000_000 <= size <= MAX_WEIGHT_BYTES, size


def test_config_is_llama_with_multi_head_attention():
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == config["num_attention_heads"]  # MHA: KV recomputation can pay
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 1024
    generation = json.loads((DEMO_DIR / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 0
    assert generation["pad_token_id"] == config["pad_token_id"] == 1


def test_tokenizer_round_trips_text(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 1
    for text in ("HAMLET.\nTo be, or not to be: that is the question.\n",
                 "  [Exeunt all but Romeo.]\n\n\nWhat's in a name?  x=3*(y+2)/7; ~`@#$%^&{}|<>\t\n",
                 "", " leading space", "0123456789 ALL CAPS lower MiXeD"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("fix\u00e8d \u2014 caf\u00e9")["input_ids"]) == "fix\u00e8d \u2014 caf\u00e9"


def test_chat_template_renders_a_scene(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How now, my lord?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "HORATIO.\nHow now, my lord?\n\nHAMLET.\n"


def test_greedy_generation_writes_printable_text(model, tokenizer):
    import torch

    prompt = "ROMEO.\nBut soft, what light through yonder window breaks?\n"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) >= 20, repr(text)
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in text)
    assert printable / len(text) > 0.95, repr(text)
    letters = sum(ch.isalpha() for ch in text)
    assert letters / len(text) > 0.5, repr(text)  # words, not punctuation or blank lines


def test_model_beats_chance_on_shakespeare(model, tokenizer):
    """A trained model, not random weights: cross-entropy on a famous passage far below ln(vocab)."""
    import math

    import torch

    text = ("HAMLET.\nTo be, or not to be,--that is the question:--\nWhether 'tis nobler in the mind to suffer\n"
            "The slings and arrows of outrageous fortune\nOr to take arms against a sea of troubles,\n")
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 0.6 * math.log(model.config.vocab_size), loss


def test_engine_and_transformers_give_identical_greedy_tokens(model):
    """The demo model through the engine's own decode loop, against transformers' generate on the same weights."""
    from engine import GenerationSettings, Generator, load_model
    from engine.hf_reference import hf_greedy, rel_err

    loaded = load_model("demo", device="cpu", dtype="float32")
    prompts = [loaded.tokenizer.encode(t) for t in ("ROMEO.\nBut soft, what light", "HAMLET.\nTo be, or not to be",
                                                    "KING.\n")]
    ours = Generator(loaded).generate(prompts, GenerationSettings(max_new_tokens=24, ignore_eos=True), keep_logits=True)
    ref_tokens, ref_logits = hf_greedy(model, prompts, max_new_tokens=24, pad_id=1)
    assert ours.token_ids == ref_tokens
    assert max(rel_err(a, b) for a, b in zip(ours.logits, ref_logits)) <= 1e-4
    assert all(text.strip() for text in ours.texts)


def test_triton_decode_attention_in_the_engine_matches_torch():
    """The Triton kernel (interpreter, head dim 64) in the engine's decode loop gives torch's tokens."""
    from engine import GenerationSettings, Generator, load_model
    from engine.hf_reference import rel_err

    loaded = load_model("demo", device="cpu", dtype="float32")
    prompts = [loaded.tokenizer.encode("ROMEO.\nBut soft"), loaded.tokenizer.encode("KING.\nWhat news, my lord?")]
    runs = {}
    for attention in ("torch", "triton"):
        engine = Generator(loaded)
        settings = GenerationSettings(max_new_tokens=8, ignore_eos=True, attention=attention)
        runs[attention] = engine.generate(prompts, settings, keep_logits=True)
        assert attention in engine.attention_why.lower()
    assert runs["triton"].token_ids == runs["torch"].token_ids
    assert max(rel_err(a, b) for a, b in zip(runs["triton"].logits, runs["torch"].logits)) <= 1e-4


def test_chat_reply_of_100_tokens_on_cpu():
    """The app's default model chats offline on CPU through the session the Chat panel uses."""
    from engine import GenerationSettings, SamplingSettings
    from engine.lab.session import LabSession

    session = LabSession()
    session.load("demo", device="cpu")
    settings = GenerationSettings(max_new_tokens=100, ignore_eos=True, stop_strings=(),
                                  sampling=SamplingSettings(temperature=0.8, top_p=0.95, seed=5))
    object.__setattr__(session.model, "chat_stop_strings", ())  # let the reply run its full 100 tokens
    updates = list(session.chat([], "How now, my lord?", settings))
    assert updates[-1].num_tokens == 100 and updates[-1].finish_reason == "length"
    assert all(u.finish_reason is None for u in updates[:-1]) and len(updates) == 100
    assert [u.reply for u in updates] == sorted((u.reply for u in updates), key=len)  # text only grows
    assert updates[-1].reply.strip() and updates[-1].decode_tok_s > 0
