"""Chat load on a served app: N API clients chatting at once, memory sampled on the server while they do.

    report = run_load(url, clients=4, turns=50, probe=MemoryProbe(device))
    mismatches = replay(session, report.transcripts, settings)   # each reply == the same turn run alone

Each client is a gradio_client `Client` on its own thread that sends its turns one after another with the
history the app returned, as a browser tab does. The app answers one job at a time (its GPU queue), so the
clients' turns interleave. A client's turns are checked as they come back (every earlier turn still there, in
order, this turn's message last, no error); after the run `replay` checks every reply against the same
conversation run alone on the session, greedy, so a reply given to the wrong client or after the wrong history
would show. The probe samples the server's memory on its own thread: live tensor bytes on the model's device,
page-locked host bytes of offload stores, the caching host allocator, and the process's resident set.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.memory import held_bytes
from engine.offload.store import pinned_bytes
from engine.lab.session import LabSession, normalise_history


WARM_TURNS = 5  # turns per client before the warm memory sample (Gradio makes a session's state on first use)


def rss_bytes() -> int:
    """The process's resident set (Linux /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryProbe:
    """Samples the server process's memory every `period_s` on a thread, between `start()` and `stop()`."""

    def __init__(self, device: torch.device | str, *, period_s: float = 0.25):
        self.device, self.period_s = torch.device(device), period_s
        self.samples: list[dict] = []
        self.warm: dict | None = None  # the sample taken when every client had its first turns answered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict:
        """One sample now: bytes held on the device, pinned by stores, cached by torch's host allocator, RSS."""
        sample = {"t_s": time.perf_counter(), "held_bytes": held_bytes(self.device), "pinned_store_bytes": pinned_bytes(),
                  "rss_bytes": rss_bytes()}
        if self.device.type == "cuda":
            sample["cuda_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
            host = torch.cuda.host_memory_stats()
            sample["pinned_cached_bytes"] = int(host.get("reserved_bytes.current", host.get("allocated_bytes.current", 0)))
        return sample

    def start(self) -> dict:
        first = self.read()
        self.samples = [first]
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvlab-memory-probe", daemon=True)
        self._thread.start()
        return first

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.samples.append(self.read())

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        last = self.read()
        self.samples.append(last)
        return last

    def mark_warm(self) -> None:
        """Take the sample later drift is measured from: the server's sessions, threads and caches exist by now."""
        self.warm = self.read()
        self.samples.append(self.warm)

    def summary(self) -> dict:
        """Per figure: first, last, min, max over the samples, the drift last - first, and (once warm) the drift
        since the warm sample."""
        out = {}
        for key in self.samples[0]:
            if key == "t_s":
                continue
            values = [s[key] for s in self.samples]
            out[key] = {"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
                        "drift": values[-1] - values[0]}
            if self.warm is not None:
                out[key] |= {"warm": self.warm[key], "drift_since_warm": values[-1] - self.warm[key]}
        out["samples"] = len(self.samples)
        return out


@dataclass
class Transcript:
    """One client's conversation as the app returned it, and what went wrong on the way."""

    client: int
    messages: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    clients: int
    turns_per_client: int
    seconds: float
    transcripts: list[Transcript]
    memory: dict | None

    @property
    def answered(self) -> int:
        return sum(len(t.replies) for t in self.transcripts)

    @property
    def problems(self) -> list[str]:
        return [p for t in self.transcripts for p in t.problems]

    def latency_ms(self) -> dict:
        values = sorted(v for t in self.transcripts for v in t.latencies_ms)
        if not values:
            return {}
        return {"median": statistics.median(values), "p95": values[min(len(values) - 1, int(0.95 * len(values)))],
                "max": values[-1]}


def _client_turns(url: str, client: int, turns: int, max_new_tokens: int, auth, transcript: Transcript,
                  start: threading.Barrier, warm: threading.Barrier | None) -> None:
    from gradio_client import Client

    api = Client(url, auth=auth, verbose=False)
    history: list = []
    start.wait()
    for turn in range(turns):
        if warm is not None and turn == WARM_TURNS:
            warm.wait()  # the last client to arrive takes the warm sample
        message = f"Client {client}, turn {turn}: what news from the court?"
        began = time.perf_counter()
        try:
            out = api.predict(message, history, max_new_tokens, 0.0, 1.0, 0, 0, api_name="/chat")
        except Exception as exc:  # noqa: BLE001 - recorded: the run reports every failure, it does not stop
            transcript.problems.append(f"client {client} turn {turn}: {type(exc).__name__}: {exc}")
            continue
        transcript.latencies_ms.append((time.perf_counter() - began) * 1e3)
        history_out = out["history"]
        turns_back = normalise_history(history_out)
        users = [t["content"] for t in turns_back if t["role"] == "user"]
        if out.get("finished") is None:
            transcript.problems.append(f"client {client} turn {turn}: the reply did not finish: {out.get('status')!r}")
            continue
        if users != [*transcript.messages, message] or turns_back[-1]["role"] != "assistant":
            transcript.problems.append(f"client {client} turn {turn}: history out of order: {users[-3:]}")
            continue
        transcript.messages.append(message)
        transcript.replies.append(turns_back[-1]["content"])
        history = history_out


def run_load(url: str, *, clients: int = 4, turns: int = 50, max_new_tokens: int = 8, auth=None,
             probe: MemoryProbe | None = None) -> LoadReport:
    """`clients` threads each chatting `turns` turns (greedy, `max_new_tokens` per reply) with the app at `url`."""
    transcripts = [Transcript(client=c) for c in range(clients)]
    barrier = threading.Barrier(clients)
    warm = threading.Barrier(clients, action=probe.mark_warm) if probe is not None and turns > WARM_TURNS else None
    threads = [threading.Thread(target=_client_turns, args=(url, c, turns, max_new_tokens, auth, transcripts[c], barrier,
                                                            warm), name=f"kvlab-load-client-{c}") for c in range(clients)]
    if probe is not None:
        probe.start()
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    memory = None
    if probe is not None:
        probe.stop()
        memory = probe.summary()
    return LoadReport(clients=clients, turns_per_client=turns, seconds=seconds, transcripts=transcripts, memory=memory)


def replay(session: LabSession, transcripts: list[Transcript], *, max_new_tokens: int) -> list[str]:
    """Each reply against the same conversation run alone on `session` (greedy, as the clients asked); returns
    one line per reply that differs."""
    from dataclasses import replace

    from engine.settings import SamplingSettings

    settings = replace(session.settings, max_new_tokens=max_new_tokens, sampling=SamplingSettings(temperature=0.0))
    mismatches = []
    for transcript in transcripts:
        history: list[dict] = []
        for turn, (message, got) in enumerate(zip(transcript.messages, transcript.replies)):
            *_, last = session.chat(history, message, settings)
            # The chat display trims a message's ends and turns tabs into spaces (random-weight models emit control
            # bytes that count as whitespace), and the app sends the displayed text back as history: compare words.
            if last.reply.split() != got.split():
                mismatches.append(f"client {transcript.client} turn {turn}: {got!r} != alone {last.reply!r}")
            history += [{"role": "user", "content": message}, {"role": "assistant", "content": got}]
    return mismatches


__all__ = ["LoadReport", "MemoryProbe", "Transcript", "replay", "run_load", "rss_bytes"]
