"""Number, slider and chat components that answer a bad value from an API client with a message, not a crash; and
`as_number`, the same check for the values the app's typed API endpoints receive.

A browser cannot type "abc" into a number box; a script calling the API can send anything. Gradio's own
components then fail inside their preprocessing (comparing a string with a bound, rounding a string) and the
client only learns that the app "raised an exception". These subclasses parse what arrives and refuse what is
not a number, not finite or out of range with `gr.Error` naming the control, the value and what to enter.
Values they accept are what Gradio's components would pass on.
"""

from __future__ import annotations

import math

import gradio as gr
from gradio.components.chatbot import ChatbotDataMessages
from pydantic import ValidationError

from engine.errors import InvalidSettingsError


def _parse(name: str, payload, *, whole: bool, low: float | None, high: float | None):
    """`payload` as a number for `name`, or gr.Error. NaN and infinities pass only through unbounded decimal
    controls (the settings refuse them with their own message, which names the valid range); whole-number and
    bounded controls cannot hold them."""
    span = f" between {low:g} and {high:g}" if low is not None and high is not None else ""
    if isinstance(payload, str):
        try:
            payload = float(payload.strip())
        except ValueError:
            raise gr.Error(f"{name} must be a number, got {payload!r}: enter a number{span}.") from None
    if isinstance(payload, bool) or not isinstance(payload, (int, float)):
        raise gr.Error(f"{name} must be a number, got {payload!r}: enter a number{span}.")
    if not math.isfinite(payload) and (whole or low is not None or high is not None):
        kind = "whole number" if whole else "number"
        raise gr.Error(f"{name} must be a finite {kind}, got {payload}: enter a {kind}{span}.")
    if whole and not float(payload).is_integer():  # Gradio would round 1.5 to 2 without a word
        raise gr.Error(f"{name} must be a whole number, got {payload:g}: enter a whole number{span}.")
    if low is not None and payload < low:
        raise gr.Error(f"{name}: value {payload:g} is less than minimum value {low:g}: enter a number{span}.")
    if high is not None and payload > high:
        raise gr.Error(f"{name}: value {payload:g} is greater than maximum value {high:g}: enter a number{span}.")
    return payload


def as_number(name: str, value, *, whole: bool, auto: bool = False):
    """A setting's value as a number, or InvalidSettingsError naming it: API clients may send strings, and floats
    for whole numbers (refused when not whole, where Gradio would round them). `auto`: "auto" (or None) is a
    value, returned as None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        if value is None or auto:
            return None
        raise InvalidSettingsError(f"{name} must be a number, got {value!r}: enter a number.")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidSettingsError(f"{name} must be a number, got {value!r}: enter a number"
                                       f"{' or auto' if auto else ''}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSettingsError(f"{name} must be a number, got {value!r}: enter a number.")
    if whole and isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidSettingsError(f"{name} must be a whole number, got {value:g}: enter a whole number.")
        return int(value)
    return value


class _Named:
    """A Gradio component subclass drawn by its parent's Svelte component, naming itself in its messages. Listed
    after the Gradio class in the bases: `is_template` makes Gradio take the first base's browser component."""

    is_template = True
    field_name = "value"

    @classmethod
    def named(cls, field_name: str, **kwargs):
        """The component, naming itself `field_name` in its messages. Not an __init__ parameter: Gradio builds a
        component's browser config from its __init__ signature, so a subclass keeps its parent's."""
        box = cls(**kwargs)
        box.field_name = field_name
        return box


class NumberBox(gr.Number, _Named):
    """gr.Number that refuses text, infinities (and NaN where it must be whole) with a message naming `field_name`."""

    def preprocess(self, payload):
        if payload is None:
            return None
        value = _parse(self.field_name, payload, whole=self.precision == 0, low=self.minimum, high=self.maximum)
        if isinstance(value, float) and not math.isfinite(value):
            return value  # unbounded and decimal: the settings' own check names it and the valid range
        return super().preprocess(value)


class SliderBox(gr.Slider, _Named):
    """gr.Slider that refuses text, NaN, infinities and out-of-range values with a message naming `field_name`."""

    def preprocess(self, payload):
        return super().preprocess(_parse(self.field_name, payload, whole=False, low=self.minimum, high=self.maximum))


class _CheckedMessages(ChatbotDataMessages):
    """The chat history as Gradio validates it, with a message for the client when it is malformed."""

    @classmethod
    def model_validate(cls, obj, *args, **kwargs):
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise gr.Error(f"The chat history is not a list of {{role, content}} messages ({first.get('msg')} at "
                           f"{where or 'the top'}): send [] or the history the app returned, or press Clear chat."
                           ) from None


class ChatHistory(gr.Chatbot):
    """gr.Chatbot whose history, sent by an API client, is checked with a message instead of a crash."""

    is_template = True  # drawn in the browser by the parent's Svelte component

    data_model = _CheckedMessages


__all__ = ["ChatHistory", "NumberBox", "SliderBox", "as_number"]
