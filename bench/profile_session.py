"""A profiling run through the app's session (what the Profile panel runs), recorded and exported.

    python bench/profile_session.py --model synthetic:llama-2-7b --placement cpu --split auto \
        --batch 8 --prompt-len 2048 --new-tokens 12 --out DIR

Loads the model, applies the settings, runs one profiling session with telemetry (recorder, NVML, CUPTI where
available), prints the run's summary and writes its trace and summary JSON under DIR: the same files the
app's Export buttons give, from the engine the app drives.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.lab.session import LabSession  # noqa: E402
from engine.settings import GenerationSettings, OffloadSettings, RunShape  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-2-7b")
    parser.add_argument("--placement", default="cpu")
    parser.add_argument("--split", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    session = LabSession()
    card = session.load(args.model)
    print(f"loaded {card['name']} on {card['device']} in {card['load_s']:.1f} s")
    split = args.split if args.split == "auto" else float(args.split)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, offload=OffloadSettings(placement=args.placement,
                                                                                           split=split))
    shape = RunShape(batch=args.batch, prompt_tokens=args.prompt_len)
    session.apply_settings(settings, shape)
    record = None
    for update in session.profile(settings, batch=shape.batch, prompt_tokens=shape.prompt_tokens):
        if update.step:
            print(f"step {update.step}/{update.num_steps}: {update.step_ms:.2f} ms (predicted "
                  f"{update.predicted_ms or float('nan'):.2f}), payload {update.payload_gb_s}", flush=True)
        record = update.record or record
    summary = record.summary()
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=1, default=str))
    args.out.mkdir(parents=True, exist_ok=True)
    trace = session.export_trace(record.run_id)
    shutil.copy(trace, args.out / trace.name)
    (args.out / "session_run.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
