"""How a panel shows a failure: one line naming the problem and the fix; the app keeps running."""

from __future__ import annotations

import traceback

from engine.errors import KVLabError

DEVICE_QUEUE = "device"  # handlers that run the model: they wait for the session's device lock, saying so


def as_markdown(text: str) -> str:
    """`text` to show in a Markdown component: "<" and ">" as entities, so that a message naming
    'synthetic:<preset>' is not cut short where the browser takes <preset> for a tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def shown(exc: BaseException) -> str:
    """`describe(exc)` for a Markdown component."""
    return as_markdown(describe(exc))


def describe(exc: BaseException) -> str:
    """A message for the UI. KV Lab's own errors already name the fix; anything else is a bug to report."""
    if isinstance(exc, KVLabError):
        return str(exc)
    traceback.print_exception(exc)
    return (f"Unexpected {type(exc).__name__}: {exc}. The loaded model is kept; if this repeats, "
            "report it with the terminal's log.")
