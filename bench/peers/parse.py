"""The peers' printed results -> figures, and a failed run's output -> the error that stopped it.

FlexGen's `run_flexgen`, KVPR's `flexgen.flex_opt` and KVPR's `run_hf_ds.py` all print the same benchmark log,
made by `flexgen.utils.write_benchmark_log`:

    model size: 12.386 GB	cache size: 4.500 GB	hidden size (p): 0.062 GB
    peak gpu mem: 18.254 GB	projected: False
    prefill latency: 0.650 s	prefill throughput: 12603.077 token/s
    decode latency: 2.950 s	decode throughput: 336.271 token/s
    total latency: 3.600 s	total throughput: 284.444 token/s

KVPR's two entry points also print the split they chose (`recompute_len: 203`). Decode latency covers the decode
steps 1..N-1 (projected from the first `--cut-gen-len` steps when `projected: True`); the prefill is apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FIELD = r"([-+0-9.eE]+|nan|inf)"
_PATTERNS = {
    "model_size_gb": rf"model size:\s*{_FIELD} GB",
    "cache_size_gb": rf"cache size:\s*{_FIELD} GB",
    "peak_gpu_mem_gb": rf"peak gpu mem:\s*{_FIELD} GB",
    "prefill_latency_s": rf"prefill latency:\s*{_FIELD} s",
    "prefill_tok_s": rf"prefill throughput:\s*{_FIELD} token/s",
    "decode_latency_s": rf"decode latency:\s*{_FIELD} s",
    "decode_tok_s": rf"decode throughput:\s*{_FIELD} token/s",
    "total_latency_s": rf"total latency:\s*{_FIELD} s",
    "total_tok_s": rf"total throughput:\s*{_FIELD} token/s",
}
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure))(?::.*)?$")


class PeerOutputError(ValueError):
    """The peer exited without printing its benchmark log."""


@dataclass(frozen=True)
class PeerLog:
    """One peer run's benchmark log; latencies in seconds for the whole run, as the peer prints them."""

    decode_latency_s: float
    decode_tok_s: float
    prefill_latency_s: float | None
    peak_gpu_mem_gb: float | None
    projected: bool  # decode latency projected from fewer steps (--cut-gen-len)
    recompute_tokens: int | None  # KVPR's chosen split (recompute_len); None for FlexGen
    cache_size_gb: float | None

    def step_ms(self, *, new_tokens: int) -> float:
        """Mean decode step: the log's decode latency over its N - 1 decode steps."""
        return self.decode_latency_s * 1e3 / max(1, new_tokens - 1)


def _last_float(pattern: str, text: str) -> float | None:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def parse_benchmark_log(text: str) -> PeerLog:
    """The last benchmark log in `text` (a peer prints one per run); raises PeerOutputError when there is none."""
    values = {key: _last_float(pattern, text) for key, pattern in _PATTERNS.items()}
    if values["decode_latency_s"] is None or values["decode_tok_s"] is None:
        raise PeerOutputError("no 'decode latency: ... decode throughput: ...' line in the peer's output")
    projected = re.findall(r"projected:\s*(True|False)", text)
    recompute = re.findall(r"recompute_len:\s*(-?\d+)", text)
    return PeerLog(decode_latency_s=values["decode_latency_s"], decode_tok_s=values["decode_tok_s"],
                   prefill_latency_s=values["prefill_latency_s"], peak_gpu_mem_gb=values["peak_gpu_mem_gb"],
                   projected=bool(projected) and projected[-1] == "True",
                   recompute_tokens=int(recompute[-1]) if recompute else None, cache_size_gb=values["cache_size_gb"])


def error_lines(stderr: str) -> list[str]:
    """Every exception line in `stderr` ("RuntimeError: ...", "AssertionError"), in order, threads' too."""
    return [line.strip() for line in stderr.splitlines() if _ERROR_LINE.match(line)]


def _main_header(lines: list[str]) -> int | None:
    """Index of the main program's "Traceback" line: one whose next frames are runpy's or the script's <module>."""
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)") and any(
                "_run_module_as_main" in nxt or " in <module>" in nxt for nxt in lines[i + 1:i + 4]):
            return i
    return None


def main_traceback_printed(stderr: str) -> bool:
    """Whether the main program printed a traceback (threads' output may split its lines, so any of its frames)."""
    return "Traceback (most recent call last)" in stderr and (
        "_run_module_as_main" in stderr or re.search(r"line \d+, in <module>", stderr) is not None)


def _mangled(line: str) -> bool:
    """A line two threads wrote into at once: caret markers or a run of spaces inside it."""
    return "^^" in line or re.search(r"\S {4,}\S", line) is not None


def failure_reason(stderr: str, stdout: str = "", *, limit: int = 600) -> str:
    """The error that stopped a peer. FlexGen's four disk-copy threads can fail beside its main program and their
    tracebacks interleave with the main one, line by line; so: of the exception lines after the main program's
    traceback began (less those of "Exception ignored in" blocks, printed at shutdown), the one whose message was
    printed fewest times (each thread prints its own, even where another thread's output splits the line), the first
    of those; else the last exception anywhere; else the last line the peer printed. Lines two threads wrote into at
    once are not taken as the error."""
    lines = stderr.splitlines()
    errors, ignored = [], False
    for i, line in enumerate(lines):
        if line.startswith("Exception ignored in"):
            ignored = True
        elif _ERROR_LINE.match(line) and not _mangled(line):
            errors.append((i, line.strip(), ignored))
            ignored = False
    header = _main_header(lines)
    if header is None and main_traceback_printed(stderr):  # its first lines split by a thread's: from its first
        header = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
    candidates = [(i, text) for i, text, ign in errors if header is not None and i > header and not ign]
    if candidates:  # how often each message was printed, in whole lines or in lines threads wrote into
        counts = {text: stderr.count(text.split(": ", 1)[-1]) for _, text in candidates}
        reason = min(candidates, key=lambda c: (counts[c[1]], c[0]))[1]
    elif errors:
        reason = errors[-1][1]
    else:
        printed = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
        reason = printed[-1] if printed else "no output"
    return reason[:limit]
