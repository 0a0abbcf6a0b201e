"""Chat prompts are token ids from the chat template with exactly one BOS, not its text re-encoded (which gave
templates that write BOS, Llama 2/3, Mistral and Gemma, a second one).

The tokenizers are built here with the tokenizers library (a word-level vocabulary of the templates' words) and
carry chat templates written for these tests in the families' formats: no downloads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.tokenizer import from_hf

LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
QWEN25 = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
          "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN3 = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and "
         "enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# A template that writes no BOS on a tokenizer whose encoding adds one (a fine-tune's template, say).
PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{{ 'assistant:' }}"

# family -> (template, bos, eos, tokenizer adds BOS when encoding text, special tokens)
FAMILIES = {
    "llama-2": (LLAMA2, "<s>", "</s>", True, ["<s>", "</s>"]),
    "llama-3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True,
                ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]),
    "mistral": (MISTRAL, "<s>", "</s>", True, ["<s>", "</s>"]),
    "qwen2.5": (QWEN25, None, "<|im_end|>", False, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "qwen3": (QWEN3, None, "<|im_end|>", False, ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]),
    "gemma": (GEMMA, "<bos>", "<eos>", True, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "plain": (PLAIN, "<s>", "</s>", True, ["<s>", "</s>"]),
}
WORDS = ("[INST] [/INST] user assistant model system You are a helpful assistant. hello there how is the weather "
         "today ? it is sunny and what about tomorrow user: assistant:").split()
CHAT = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "it is sunny"},
        {"role": "user", "content": "what about tomorrow ?"}]


def hf_tokenizer(family: str):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, adds_bos, specials = FAMILIES[family]
    vocab = {token: i for i, token in enumerate(["<unk>", *specials, *dict.fromkeys(WORDS)])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens([AddedToken(t, special=True) for t in specials])
    if adds_bos:
        raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, unk_token="<unk>", pad_token=eos)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chat_prompt_ids_hold_exactly_one_bos(family):
    hf = hf_tokenizer(family)
    tok = from_hf(hf)
    _, bos, _, adds_bos, _ = FAMILIES[family]
    ids = tok.chat_ids(CHAT)
    template_ids = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    text = tok.chat_prompt(CHAT)
    if bos is None:  # Qwen: no BOS anywhere, the template's tokens as they are
        assert tok.bos_token_id is None and ids == template_ids and ids == tok.encode(text)
        return
    bos_id = hf.convert_tokens_to_ids(bos)
    assert tok.adds_bos == adds_bos
    assert ids[0] == bos_id and ids[1] != bos_id, ids[:3]
    assert ids[1:] == (template_ids[1:] if template_ids[0] == bos_id else template_ids)
    # Llama 2 writes BOS before every user turn by design; only the start must not repeat it.
    assert ids.count(bos_id) == (2 if family == "llama-2" else 1)
    if text.startswith(bos):  # what the old path did: the template's BOS, then the encoder's
        assert tok.encode(text)[:2] == [bos_id, bos_id]
    assert hf.decode(ids[1:], skip_special_tokens=False).split() == hf.decode(
        hf(text, add_special_tokens=False)["input_ids"], skip_special_tokens=False).removeprefix(bos).split()


def test_generation_prompt_ends_the_ids():
    tok = from_hf(hf_tokenizer("gemma"))
    ids = tok.chat_ids(CHAT)
    assert tok._hf.convert_ids_to_tokens(ids[-2:]) == ["<start_of_turn>", "model"]


def test_a_tokenizer_without_a_template_reads_a_transcript_with_its_bos():
    hf = hf_tokenizer("mistral")
    hf.chat_template = None
    tok = from_hf(hf)
    ids = tok.chat_ids(CHAT)
    assert ids == tok.encode(tok.chat_prompt(CHAT)) and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


@pytest.mark.parametrize("family", ["llama-3", "gemma", "qwen3"])
def test_session_fits_the_chat_as_ids_with_one_bos(family):
    """engine/lab/session.py sends the template's ids to the model (Generator takes token-id prompts)."""
    from engine.lab.session import LabSession

    tok = from_hf(hf_tokenizer(family))
    model = SimpleNamespace(tokenizer=tok, spec=SimpleNamespace(max_positions=4096))
    prompt, length, dropped = LabSession._fit_prompt(model, CHAT[:2], CHAT[2]["content"], 16)
    assert prompt == tok.chat_ids(CHAT) and length == len(prompt) and dropped == 0
    # A context too short for the history drops whole turns, still one BOS.
    model.spec.max_positions = len(tok.chat_ids(CHAT[2:])) + 16
    prompt, length, dropped = LabSession._fit_prompt(model, CHAT[:2], CHAT[2]["content"], 16)
    assert dropped == 2 and prompt == tok.chat_ids(CHAT[2:]) and length + 16 <= model.spec.max_positions
    if tok.bos_token_id is not None:
        assert prompt[0] == tok.bos_token_id and prompt[1] != tok.bos_token_id
