"""Where a decode step's GPU time goes: kernels grouped by kind, from torch.profiler over eager steps.

    python bench/profile_decode.py [--model synthetic:llama-2-7b] [--batch 8] [--prompt-len 2048]

Prints a table of GPU time per kind (GEMM, attention, elementwise/norm, copies) per decode step, and
the 15 costliest kernels. Eager steps (no CUDA graph) so every kernel is attributed; the graph replays
the same kernels without the launch gaps.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import GenerationSettings, load_model  # noqa: E402
from engine import forward  # noqa: E402
from engine.decode_backend import choose_decode_attention  # noqa: E402
from engine.kv_cache import KVCache  # noqa: E402

# Kinds by kernel name. Our Triton attention kernels are named exactly `_kernel` and `_merge_kernel`.
ATTENTION_NAMES = ("_kernel", "_merge_kernel")
KINDS = (("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
         ("gemm", ("gemm", "gemv", "sm90", "cutlass", "splitk", "nvjet", "cublas")),
         ("copy/scatter", ("copy", "scatter", "index", "cat")),
         ("elementwise/norm", ("elementwise", "reduce", "vectorized", "pow", "mean", "rsqrt", "mul", "add", "silu",
                               "neg", "unrolled", "triton_")))


def kind_of(name: str) -> str:
    if name in ATTENTION_NAMES:
        return "attention"
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-2-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--compile", action="store_true", help="profile the compiled step (torch.compile)")
    args = parser.parse_args(argv)
    model = load_model(args.model, device="cuda", dtype="bfloat16")
    spec = model.spec
    max_tokens = args.prompt_len + 64
    cache = KVCache(spec, batch=args.batch, max_tokens=max_tokens, dtype=model.dtype, device=model.device)
    attend, why = choose_decode_attention(GenerationSettings(attention=args.attention), device=model.device,
                                          head_dim=spec.head_dim, sliding_window=spec.sliding_window)
    ids = torch.randint(3, spec.vocab_size, (args.batch,), device="cuda")
    pos = torch.full((args.batch,), args.prompt_len, device="cuda")
    def step():
        return forward.decode_step(model.adapter, cache, ids, pos, kv_len=max_tokens, attend=attend)

    if args.compile:
        from engine.compiled_decode import CompiledDecode

        compiled = CompiledDecode(model.adapter, attend)

        def step():  # noqa: F811 - the compiled step replaces the eager one
            return compiled(cache, ids, pos)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    per_kind_us, per_kernel, count = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kind_us[kind_of(event.name)] += event.device_time_total / args.steps
            per_kernel[event.name] += event.device_time_total / args.steps
            count[kind_of(event.name)] += 1 / args.steps
    total = sum(per_kind_us.values())
    print(f"{args.model} B{args.batch} S{max_tokens}, attention: {why}, {'compiled' if args.compile else 'eager'}")
    print(f"| kind | GPU ms/step | % | kernels/step |\n|---|---|---|---|")
    for kind, us in per_kind_us.most_common():
        print(f"| {kind} | {us / 1e3:.3f} | {100 * us / total:.1f} | {count[kind]:.0f} |")
    print(f"| total | {total / 1e3:.3f} | 100 | {sum(count.values()):.0f} |\n")
    for name, us in per_kernel.most_common(15):
        print(f"{us / 1e3:8.3f} ms  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
