"""How panels declare their part of the app's API for scripts: typed Python functions served with `gr.api`.

Each panel registers, beside its components, the endpoints a program needs to do what the panel does. They take
named, typed parameters (what `Client.view_api()` documents is what they accept), return plain JSON named by
`output`, raise `gr.Error` with KV Lab's message when something is refused, and act for the calling client
(`owner`): its applied settings, its runs in view. The browser's own events are private: the page is one client of
these panels, a script is another.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import typing
from collections.abc import Callable

import gradio as gr
from gradio.context import get_blocks_context
from gradio_client.utils import python_type_to_json_schema

from engine.errors import KVLabError
from panels.errors import describe

PRIVATE = dict(api_visibility="private")  # the page's own events: not offered to API clients


def owner(request: gr.Request | None) -> str | None:
    """Who is asking: the Gradio session of the browser tab or API client (None when called from Python)."""
    return getattr(request, "session_hash", None) if request is not None else None


def _raised(exc: BaseException) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    return gr.Error(describe(exc) if isinstance(exc, KVLabError) else describe(exc), print_exception=False)


def _refusing(fn: Callable) -> Callable:
    """`fn` with KV Lab's errors (and anything unexpected) raised as gr.Error, which the client shows verbatim."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure reaches the client as its message
                raise _raised(exc) from None
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise _raised(exc) from None
    return call


def endpoint(fn: Callable, *, api_name: str, output: str, **options) -> None:
    """Serve `fn` at `/api_name`; its one return value (each streamed one, for a generator) is documented as
    `output`, of the type its annotation names."""
    dep = gr.api(_refusing(fn), api_name=api_name, **options)
    result = get_blocks_context().fns[dep["id"]].outputs[0]
    result.label = output  # gr.api names it "1st"
    returned = typing.get_type_hints(fn).get("return")
    if typing.get_origin(returned) in (collections.abc.Iterator, collections.abc.Generator):
        returned = typing.get_args(returned)[0]
    if returned is not None:  # gr.api reads the annotation as written: a string under postponed annotations
        result._api_info = python_type_to_json_schema(returned)


__all__ = ["PRIVATE", "endpoint", "owner"]
