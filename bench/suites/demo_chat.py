"""The embedded demo model answering in chat: a 100-token reply through the app's session, CPU and GPU.

What the Chat panel does (LabSession.chat: template, streaming, stop strings), timed end to end: the
time to a full 100-token reply (template + prefill + decode), median over repeats after a warm-up,
with the reply's first line kept as a sample. The stop at a blank line is lifted so every reply is 100
tokens long.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.report import Headline, Row, SuiteResult
from engine import GenerationSettings, SamplingSettings
from engine.lab.session import LabSession

MESSAGE = "How now, my lord? What news from the court?"


def add_arguments(parser) -> None:
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)


def _reply(session: LabSession, new_tokens: int, seed: int):
    settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True,
                                  sampling=SamplingSettings(temperature=0.8, top_p=0.95, seed=seed))
    start = time.perf_counter()
    last = None
    for last in session.chat([], MESSAGE, settings):
        pass
    return time.perf_counter() - start, last


def run(args) -> SuiteResult:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows, notes, details, headlines = [], [], {}, []
    for device in devices:
        session = LabSession()
        session.load("demo", device=device)
        object.__setattr__(session.model, "chat_stop_strings", ())  # full-length replies, for timing
        _reply(session, args.new_tokens, seed=0)  # warm-up: allocator, kernels, graph capture
        runs = [_reply(session, args.new_tokens, seed=1 + r) for r in range(args.repeat)]
        seconds = [s for s, _ in runs]
        tokens = {u.num_tokens for _, u in runs}
        median_s = statistics.median(seconds)
        sample = runs[0][1].reply.strip().splitlines()[0] if runs[0][1].reply.strip() else ""
        details[device] = {"reply_s": seconds, "decode_tok_s": [u.decode_tok_s for _, u in runs], "sample": sample,
                           "dtype": str(session.model.dtype), "tokens": sorted(tokens)}
        rows.append(Row(case=f"demo chat, {args.new_tokens}-token reply, {device} ({session.model.dtype})",
                        ms=median_s * 1e3 / args.new_tokens, tok_s=args.new_tokens / median_s,
                        extra={"reply_s": median_s}))
        notes.append(f"{device}: a {args.new_tokens}-token reply took {median_s:.2f} s (median of {args.repeat}); "
                     f"sample: {sample[:80]!r}")
        headlines.append(Headline(f"demo_chat_{device}_reply_s", median_s, f"s per {args.new_tokens}-token reply"))
    notes.append("ms/step here is the whole reply's time over its tokens (template, prefill and decode included)")
    return SuiteResult(suite="demo_chat", rows=rows, headlines=headlines, notes=notes, details=details)
