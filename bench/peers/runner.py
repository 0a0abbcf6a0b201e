"""One peer run in its own subprocess: its own PYTHONPATH, offline, a wall-clock limit; every failure is recorded.

A peer that raises is recorded with the error that stopped it; one that runs past its limit is ended (its whole
process group: it was started in a session of its own) and recorded as timed out. FlexGen does not exit after an
error in its main thread (its disk-copy threads keep the interpreter alive), so a run whose main program printed
a traceback and then nothing for `hang_grace_s` is ended too, with that traceback's error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers.parse import (PeerLog, PeerOutputError, error_lines, failure_reason, main_traceback_printed,
                               parse_benchmark_log)

TAIL_CHARS = 3000  # of stdout and stderr kept in the results for a failed run


@dataclass(frozen=True)
class PeerCommand:
    """What to start, where, and with which Python path (the peer's alone: KV Lab's checkout is not on it)."""

    argv: tuple[str, ...]
    cwd: Path
    pythonpath: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # added to the offline environment

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env |= {"PYTHONPATH": os.pathsep.join(self.pythonpath), "PYTHONUNBUFFERED": "1", "PYTHONNOUSERSITE": "1",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "HF_HOME": str(self.cwd / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
        return env | self.env

    @property
    def shell_line(self) -> str:
        import shlex

        return (f"cd {shlex.quote(str(self.cwd))} && PYTHONPATH={shlex.quote(os.pathsep.join(self.pythonpath))} "
                + " ".join(shlex.quote(a) for a in self.argv))


@dataclass(frozen=True)
class PeerOutcome:
    status: str  # "ok", "failed" or "timeout"
    wall_s: float
    returncode: int | None  # None when the suite ended it
    error: str | None  # why it failed, from its own output
    log: PeerLog | None  # its benchmark log, when it printed one
    stdout_tail: str
    stderr_tail: str
    errors_seen: tuple[str, ...] = ()  # every exception line it printed (threads' too), first few
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _end(proc: subprocess.Popen, *, grace_s: float = 5.0) -> None:
    """End the peer's process group (SIGTERM, then SIGKILL): it was started in a session of its own."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_peer(command: PeerCommand, *, name: str, timeout_s: float, hang_grace_s: float = 20.0,
             poll_s: float = 0.5) -> PeerOutcome:
    """Run `command`, its output to `<cwd>/logs/<name>.out/.err`; never raises for what the peer does."""
    logs = command.cwd / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
    start = time.monotonic()
    try:
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(list(command.argv), cwd=command.cwd, env=command.environment(), stdout=out,
                                    stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        return PeerOutcome(status="failed", wall_s=0.0, returncode=None, error=f"could not start: {exc}", log=None,
                           stdout_tail="", stderr_tail="")
    status, ended_why, last_size, last_change = None, None, -1, start
    while proc.poll() is None:
        time.sleep(poll_s)
        now = time.monotonic()
        size = out_path.stat().st_size + err_path.stat().st_size
        if size != last_size:
            last_size, last_change = size, now
        if now - start > timeout_s:
            _end(proc)
            status, ended_why = "timeout", f"ran past its limit of {timeout_s:.0f} s and was ended"
            break
        if now - last_change > hang_grace_s and main_traceback_printed(_read(err_path)):
            _end(proc)
            status, ended_why = "failed", (f"printed a traceback, then nothing for {hang_grace_s:.0f} s: ended "
                                           "(its threads keep it alive)")
            break
    wall_s = time.monotonic() - start
    stdout, stderr = _read(out_path), _read(err_path)
    errors = tuple(dict.fromkeys(e[:300] for e in error_lines(stderr)))[:6]
    try:
        log, no_log = parse_benchmark_log(stdout), ""
    except PeerOutputError as exc:
        log, no_log = None, str(exc)
    if log is not None:  # it printed its figures: they stand, even if it then had to be ended
        return PeerOutcome(status="ok", wall_s=wall_s, returncode=proc.returncode, error=None, log=log,
                           stdout_tail=stdout[-TAIL_CHARS // 3:], stderr_tail="", errors_seen=errors,
                           note=f"after its figures it {ended_why}" if ended_why else "")
    reason = failure_reason(stderr, stdout)
    if status == "timeout":
        error = f"{ended_why}; the last error it printed: {reason}" if errors else ended_why
    elif ended_why:
        error = f"{reason} ({ended_why})"
    else:
        error = reason if proc.returncode else f"exited 0 but {no_log}"
    return PeerOutcome(status=status or "failed", wall_s=wall_s, returncode=proc.returncode, error=error, log=None,
                       stdout_tail=stdout[-TAIL_CHARS:], stderr_tail=stderr[-TAIL_CHARS:], errors_seen=errors)
