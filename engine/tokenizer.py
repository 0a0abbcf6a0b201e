"""Text <-> token ids for the engine: a Hugging Face tokenizer, or bytes for synthetic models.

Synthetic presets have random weights and no vocabulary of their own; they read text as UTF-8 bytes
(ids 3..258) so that chat and profiling work on them like on any other model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tokenizer:
    """The small surface the engine and the panels use, whatever tokenizer is underneath."""

    name: str
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    pad_token_id: int
    _hf: object | None = field(default=None, repr=False)

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return list(self._hf(text, add_special_tokens=True)["input_ids"])
        prefix = [self.bos_token_id] if self.bos_token_id is not None else []
        return prefix + [b + ByteCodec.OFFSET for b in text.encode("utf-8")]

    def chat_prompt(self, messages: list[dict]) -> str:
        """A chat ([{role, content}]) as the prompt text the model continues with its reply."""
        if self._hf is not None and getattr(self._hf, "chat_template", None):
            return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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


def byte_tokenizer(*, bos: int, eos: int, pad: int) -> Tokenizer:
    return Tokenizer(name="bytes (synthetic model)", eos_token_ids=frozenset({eos}), bos_token_id=bos, pad_token_id=pad)


def from_hf(hf_tokenizer, generation_config=None) -> Tokenizer:
    """Wrap a transformers tokenizer; EOS ids come from the generation config where it names them."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = hf_tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    pad = hf_tokenizer.pad_token_id
    if pad is None:
        pad = next(iter(eos_ids), 0)
    return Tokenizer(
        name=type(hf_tokenizer).__name__,
        eos_token_ids=eos_ids,
        bos_token_id=hf_tokenizer.bos_token_id,
        pad_token_id=pad,
        _hf=hf_tokenizer,
    )
