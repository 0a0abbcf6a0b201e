"""What the app holds between clicks: the loaded model, one job at a time, errors turned into messages.

Panels talk to a `LabSession` only (no torch in panels). A failed load keeps the model that was loaded
before; a failed run frees its memory and leaves the model in place for the next one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator

from engine.errors import InvalidSettingsError
from engine.generator import Generator
from engine.loader import LoadedModel, load_model
from engine.settings import GenerationSettings

MAX_CHAT_CHARS = 20_000  # longer pastes are refused: the model's context is far shorter anyway


@dataclass(frozen=True)
class ChatUpdate:
    """One streamed state of a reply: the text so far and the run's figures."""

    reply: str
    num_tokens: int
    decode_tok_s: float
    elapsed_s: float
    finish_reason: str | None  # None while streaming


class LabSession:
    def __init__(self) -> None:
        self.model: LoadedModel | None = None
        self._lock = threading.Lock()  # one GPU job at a time, whatever the UI's queue does

    # -- model ---------------------------------------------------------------------------------
    def load(self, source: str, *, device: str | None = None, dtype: str | None = None) -> dict:
        """Load `source` and make it current; on failure the previous model stays loaded."""
        with self._lock:
            self.model = load_model(source, device=device, dtype=dtype)
            return self.model.card()

    def require_model(self) -> LoadedModel:
        if self.model is None:
            raise InvalidSettingsError("No model is loaded: load one in the Model panel first.")
        return self.model

    # -- chat ----------------------------------------------------------------------------------
    def chat(self, history: list[dict], message: str, settings: GenerationSettings) -> Iterator[ChatUpdate]:
        """Stream the model's reply to `message` after `history` ([{role, content}, ...])."""
        if not isinstance(message, str) or not message.strip():
            raise InvalidSettingsError("The message is empty: type something to send.")
        if len(message) > MAX_CHAT_CHARS:
            raise InvalidSettingsError(f"The message has {len(message)} characters; the limit is {MAX_CHAT_CHARS}: "
                                       "send a shorter text.")
        model = self.require_model()
        messages = [*normalise_history(history), {"role": "user", "content": message}]
        prompt = model.tokenizer.chat_prompt(messages)
        stops = tuple(dict.fromkeys((*model.chat_stop_strings, *settings.stop_strings)))
        settings = replace(settings, stop_strings=stops)
        with self._lock:
            start = time.perf_counter()
            reply, decode_ms, num_tokens = "", 0.0, 0
            for event in Generator(model).stream([prompt], settings):
                reply += event.text_deltas[0]
                if event.token_ids[0] is not None:
                    num_tokens += 1
                if event.step > 0:
                    decode_ms += event.step_ms
                done = event.finished[0]
                yield ChatUpdate(reply=reply, num_tokens=num_tokens,
                                 decode_tok_s=(num_tokens - 1) / (decode_ms * 1e-3) if decode_ms else 0.0,
                                 elapsed_s=time.perf_counter() - start,
                                 finish_reason=event.finish_reasons[0] if done else None)
                if done:
                    return


def normalise_history(history) -> list[dict]:
    """Chat history as [{role, content: str}]. Browsers send content as blocks, API clients as strings."""
    out = []
    for turn in history or []:
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            continue
        content = turn.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        if isinstance(content, str):
            out.append({"role": turn["role"], "content": content})
    return out


__all__ = ["ChatUpdate", "LabSession", "normalise_history"]
