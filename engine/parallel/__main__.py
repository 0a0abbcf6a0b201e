"""Generate with a tensor-parallel engine from the command line; launch one process per GPU with torchrun:

    torchrun --nproc-per-node 2 -m engine.parallel --model synthetic:llama-3-70b --prompt "To be, or not" \\
        --max-new-tokens 32 --placement cpu

Rank 0 prints the reply, its step times and what each rank's plan moved; the other ranks follow it.
"""

from __future__ import annotations

import argparse
import statistics


def main(argv: list[str] | None = None) -> int:
    from engine.parallel import launch_engine
    from engine.parallel.group import DEFAULT_TIMEOUT_S, LaunchSettings
    from engine.settings import PLACEMENTS, GenerationSettings, OffloadSettings

    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m engine.parallel", description=__doc__)
    parser.add_argument("--model", required=True, help="'synthetic:<preset>', a model directory or a hub id")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--placement", choices=PLACEMENTS, default="gpu")
    parser.add_argument("--split", default="auto", help="'auto' or the fraction of offloaded tokens recomputed")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default), float16, float32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    args = parser.parse_args(argv)
    split = args.split if args.split == "auto" else float(args.split)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens,
                                  offload=OffloadSettings(placement=args.placement, split=split))
    engine = launch_engine(args.model, launch=LaunchSettings.from_env(device=args.device, timeout_s=args.timeout_s),
                           dtype=args.dtype)
    if engine.rank != 0:
        engine.follow()
        return 0
    try:
        result = engine.generate(args.prompt, settings)
    finally:
        engine.close()
    for prompt, text in zip(args.prompt, result.texts):
        print(f"{prompt!r} -> {text!r}")
    steps = result.step_ms[2:] or result.step_ms
    print(f"{engine.world_size} ranks: prefill {result.prefill_ms:.1f} ms, decode "
          f"{statistics.median(steps) if steps else 0:.2f} ms/step (median), {result.decode_tok_s:.1f} tok/s")
    for facts in engine.rank_facts:
        moved = f", {statistics.median(facts.h2d_bytes) / 1e6:.2f} MB H2D per step" if facts.h2d_bytes else ""
        print(f"  rank {facts.rank} ({facts.device}): weights {facts.weight_bytes / 2**30:.2f} GiB, K/V "
              f"{facts.kv_bytes_per_token} B/token{moved}, {facts.collective_calls} all-reduces")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
