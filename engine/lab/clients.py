"""What is whose: one loaded model for everyone, settings and a run in view for each browser tab or API client.

The model is shared because there is one device to run it on. Everything a client chooses for itself lives in its
`ClientState`, keyed by its Gradio session (`gr.Request.session_hash`: one per page load, one per gradio_client
`Client`), so one tab's Apply never changes what another tab runs. Scripts that drive a `LabSession` from Python
are the client `None`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from engine.settings import GenerationSettings, RunShape

MAX_CLIENTS = 1000  # the least recently seen clients are forgotten past this (their next request starts afresh)


@dataclass
class ClientState:
    """One client's applied settings and profiling shape, and the run its Profile panel shows."""

    settings: GenerationSettings = field(default_factory=GenerationSettings)
    shape: RunShape = field(default_factory=RunShape)
    viewing: int | None = None  # run id; None: the latest run


class Clients:
    """ClientState per owner, made on first use; bounded, the least recently used dropped first."""

    def __init__(self, capacity: int = MAX_CLIENTS) -> None:
        self._capacity = capacity
        self._states: OrderedDict[str | None, ClientState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, owner: str | None) -> ClientState:
        with self._lock:
            state = self._states.pop(owner, None) or ClientState()
            self._states[owner] = state
            while len(self._states) > max(1, self._capacity):
                oldest = next(iter(self._states))
                if oldest is None:  # the Python client is never forgotten
                    self._states.move_to_end(None)
                    continue
                del self._states[oldest]
            return state

    def __len__(self) -> int:
        return len(self._states)


__all__ = ["ClientState", "Clients", "MAX_CLIENTS"]
