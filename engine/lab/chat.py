"""What a chat turn is made of, apart from running the model: the message's checks, the history as the model reads it
(the reply footers the panel adds taken out), and one streamed state of a reply."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.errors import InvalidSettingsError

MAX_CHAT_CHARS = 20_000  # longer pastes are refused: the model's context is far shorter anyway


@dataclass(frozen=True)
class ChatUpdate:
    """One streamed state of a reply: the text so far and the run's figures."""

    reply: str
    num_tokens: int
    decode_tok_s: float
    elapsed_s: float
    finish_reason: str | None  # None while streaming
    dropped_turns: int = 0  # oldest history turns left out so the prompt fits the context
    capped_at: int | None = None  # the reply's length limit when the context left less than asked for
    waiting_for: str | None = None  # what holds the device while the reply waits for it


def check_message(message) -> None:
    """A chat message the model can read, or InvalidSettingsError naming what is wrong with it."""
    if not isinstance(message, str) or not message.strip():
        raise InvalidSettingsError("The message is empty: type something to send.")
    if len(message) > MAX_CHAT_CHARS:
        raise InvalidSettingsError(f"The message has {len(message):,} characters; the limit is {MAX_CHAT_CHARS:,}: "
                                   "send a shorter text.")
    surrogate = next((i for i, c in enumerate(message) if _is_surrogate(c)), None)
    if surrogate is not None:
        raise InvalidSettingsError(
            f"The message holds a lone surrogate (U+{ord(message[surrogate]):04X} at character {surrogate + 1}), "
            "which is not valid Unicode text and cannot be encoded: paste the text again from its source.")


def _is_surrogate(char: str) -> bool:
    """Half of a UTF-16 pair, alone: JSON can carry one, UTF-8 cannot encode it."""
    return 0xD800 <= ord(char) <= 0xDFFF


def _valid_text(text: str) -> str:
    """Earlier turns as the tokenizer can encode them: a lone surrogate (API clients can send one) becomes U+FFFD."""
    return "".join("\ufffd" if _is_surrogate(c) else c for c in text)


# The figures the Chat panel writes under each finished reply; not part of what the model said.
REPLY_FOOTER = re.compile(r"(?:\n\n|^)_\d+ tokens · [0-9.,]+ tok/s[^_\n]*_$")  # alone: a blank reply, trimmed by the display


def reply_footer(num_tokens: int, decode_tok_s: float, note: str = "") -> str:
    return f"\n\n_{num_tokens} tokens · {decode_tok_s:.1f} tok/s{note}_"


def normalise_history(history) -> list[dict]:
    """Chat history as [{role, content: str}], the panel's reply footers removed. Browsers send content as
    blocks, API clients as strings."""
    out = []
    for turn in history or []:
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            continue
        content = turn.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        if isinstance(content, str):
            if turn["role"] == "assistant":
                content = REPLY_FOOTER.sub("", content)
            out.append({"role": turn["role"], "content": _valid_text(content)})
    return out


__all__ = ["MAX_CHAT_CHARS", "REPLY_FOOTER", "ChatUpdate", "check_message", "normalise_history", "reply_footer"]
