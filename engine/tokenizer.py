"""Text <-> token ids for the engine: a Hugging Face tokenizer, or bytes for synthetic models.

Synthetic presets have random weights and no vocabulary of their own; they read text as UTF-8 bytes
(ids 3..258) so that chat and profiling work on them like on any other model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# A text any real tokenizer encodes to a few tokens and decodes back to words.
_PROBE_TEXT = "Hello, world! The answer is 42."


@dataclass
class Tokenizer:
    """The small surface the engine and the panels use, whatever tokenizer is underneath."""

    name: str
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    pad_token_id: int
    _hf: object | None = field(default=None, repr=False)
    # Whether encoding text starts it with BOS (Llama's, Mistral's, Gemma's and OPT's tokenizers do; Qwen's has no
    # BOS): a chat prompt then starts with that one BOS too.
    adds_bos: bool = True

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return list(self._hf(text, add_special_tokens=True)["input_ids"])
        prefix = [self.bos_token_id] if self.bos_token_id is not None else []
        return prefix + [b + ByteCodec.OFFSET for b in text.encode("utf-8")]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A chat ([{role, content}]) as the token ids the model continues with its reply: what the model reads.

        The chat template's own tokens, with exactly one BOS at the start where the tokenizer uses one: templates that
        write BOS (Llama 2/3, Mistral, Gemma) keep theirs and get no second one, templates that do not get the one
        that encoding text would add. Never re-encode `chat_prompt`'s text: that adds a second BOS."""
        if self._hf is not None and getattr(self._hf, "chat_template", None):
            ids = list(self._hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"])
            bos = self.bos_token_id
            if bos is not None:
                while ids[:2] == [bos, bos]:
                    ids = ids[1:]
                if self.adds_bos and ids[:1] != [bos]:
                    ids = [bos, *ids]
            return ids
        return self.encode(self._transcript(messages))

    def chat_prompt(self, messages: list[dict]) -> str:
        """A chat as text, for display (the template's rendering, BOS included where it writes one). The model reads
        `chat_ids`."""
        if self._hf is not None and getattr(self._hf, "chat_template", None):
            return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._transcript(messages)

    @staticmethod
    def _transcript(messages: list[dict]) -> str:
        # No template (synthetic or base models): a plain transcript the reply continues.
        lines = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def decode(self, token_ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(token_ids, skip_special_tokens=True)
        return ByteCodec.decode(token_ids)


class ByteCodec:
    OFFSET = 3  # ids 0, 1, 2 are pad, bos, eos

    @staticmethod
    def decode(token_ids: list[int]) -> str:
        raw = bytes(i - ByteCodec.OFFSET for i in token_ids if ByteCodec.OFFSET <= i < ByteCodec.OFFSET + 256)
        return raw.decode("utf-8", errors="replace")


def byte_tokenizer(*, bos: int, eos: int, pad: int, name: str = "bytes (synthetic model)") -> Tokenizer:
    return Tokenizer(name=name, eos_token_ids=frozenset({eos}), bos_token_id=bos, pad_token_id=pad)


def unusable_reason(hf_tokenizer, *, vocab_size: int) -> str | None:
    """Why a loaded transformers tokenizer cannot serve a model of `vocab_size` tokens (None: it can).

    transformers 5 builds a tokenizer with a one-token vocabulary, which encodes every text to nothing, for a
    directory that has no tokenizer files; a tokenizer of another model gives ids past the vocabulary."""
    size = len(hf_tokenizer)
    try:
        ids = list(hf_tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
        text = hf_tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer raises anything
        return f"cannot encode text ({type(exc).__name__}: {exc})"
    unk = getattr(hf_tokenizer, "unk_token_id", None)
    if not ids or size <= 1:
        return f"has a vocabulary of {size} token(s) for a model of {vocab_size} and encodes text to nothing"
    if unk is not None and all(i == unk for i in ids):
        return f"reads every word as unknown (vocabulary of {size} tokens for a model of {vocab_size})"
    if max(ids) >= vocab_size:
        return f"gives token ids up to {max(ids)}, past the model's {vocab_size}-token vocabulary (another model's?)"
    if not any(word in text for word in ("Hello", "world", "answer")):
        return f"does not decode what it encodes ({_PROBE_TEXT!r} came back as {text!r})"
    return None


def from_hf(hf_tokenizer, generation_config=None) -> Tokenizer:
    """Wrap a transformers tokenizer; EOS ids come from the generation config where it names them."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = hf_tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    pad = hf_tokenizer.pad_token_id
    if pad is None:
        pad = next(iter(eos_ids), 0)
    bos = hf_tokenizer.bos_token_id
    adds_bos = bos is not None and list(hf_tokenizer("x", add_special_tokens=True)["input_ids"][:1]) == [bos]
    return Tokenizer(
        name=type(hf_tokenizer).__name__,
        eos_token_ids=eos_ids,
        bos_token_id=bos,
        pad_token_id=pad,
        _hf=hf_tokenizer,
        adds_bos=adds_bos,
    )
