"""One job at a time on the device: who holds it, and how the others are refused or wait.

A model load that finds the device busy is refused at once, naming the running job (waiting silently behind a long
profile looks like a hang); a chat reply or a profile waits, and while it waits it can say, every WAIT_REPORT_S,
what holds the device and who started it. A finished job gives back the memory its thread kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from engine.errors import BusyError

WAIT_REPORT_S = 0.5  # how often a job waiting for the device says so


class DeviceLock:
    """The session's device: `held(what)` to run a job or be refused, `queue(what)` to wait for it saying why."""

    def __init__(self, *, on_release: Callable[[], None], kept: Callable[[], str]) -> None:
        self.lock = threading.Lock()
        self.job: str | None = None  # what holds the device ("a chat reply", "profile run #3")
        self.owner: str | None = None  # who started it
        self._on_release = on_release  # gives back the memory the job's thread kept
        self._kept = kept  # " The loaded model (x) is kept." or ""

    @contextmanager
    def held(self, what: str, *, refused: str, owner: str | None = None, wait: bool = False):
        """Hold the device for `what`, or raise BusyError ("Cannot `refused` while ... is running") at once
        (`wait`: wait for the running job instead, saying nothing)."""
        if not self.lock.acquire(blocking=wait):
            raise BusyError(f"Cannot {refused} while {self.job or 'another job'} is running: press Stop or wait for it "
                            f"to finish, then try again.{self._kept()}")
        self.job, self.owner = what, owner
        try:
            yield
        finally:
            self.release()

    def queue(self, what: str, owner: str | None, stop: threading.Event, held: list,
              describe: Callable[[str | None], str]) -> Iterator[str]:
        """Wait for the device, yielding `describe(owner)` every WAIT_REPORT_S, until it is taken (then `held` gets
        an entry and the caller must `release`) or `stop` is set (then it returns without it)."""
        if not self.lock.acquire(blocking=False):
            while True:
                if stop.is_set():
                    return
                yield describe(owner)
                if self.lock.acquire(timeout=WAIT_REPORT_S):
                    break
        self.job, self.owner = what, owner
        held.append(True)

    def release(self) -> None:
        self.job = self.owner = None
        self._on_release()
        self.lock.release()

    def who(self, owner: str | None) -> str:
        """Who started the running job, said to `owner`."""
        if self.owner is None:
            return "started from Python"
        return "started here" if self.owner == owner else "started by another tab or an API client"


__all__ = ["WAIT_REPORT_S", "DeviceLock"]
