"""Where a decode step's GPU time goes: kernels grouped by kind, from torch.profiler over eager steps.

    python bench/profile_decode.py [--model synthetic:llama-2-7b] [--batch 8] [--prompt-len 2048] [--fused]

Prints a table of GPU time per kind (GEMM, attention, norm, RoPE, activation, copies, other elementwise) per
decode step, the kernels per step, and the 15 costliest kernels; beside it the same step replayed from a CUDA graph,
whose time over the kernels' sum is what the launches cost. The bench (bench/suites/decode.py) calls
`step_breakdown` so that a missed target says where the time went. On a CPU it profiles CPU ops (a smoke run).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import GenerationSettings, load_model  # noqa: E402
from engine.decode import forward  # noqa: E402
from engine.decode.backend import choose_decode_attention  # noqa: E402
from engine.decode.kv_cache import KVCache  # noqa: E402

# Kinds by kernel name: ours by their exact names first (the decode-attention kernel is `_kernel`/`_merge_kernel`),
# then library kernels by keyword.
OUR_KERNELS = {"_kernel": "attention", "_merge_kernel": "attention", "_skinny_gemm_kernel": "gemm",
               "_add_rms_norm_kernel": "norm", "_add_layer_norm_kernel": "norm", "_rope_qkv_kernel": "rope",
               "_rope_kernel": "rope", "_gated_act_kernel": "activation"}
KINDS = (("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
         ("gemm", ("gemm", "gemv", "sm90", "cutlass", "splitk", "nvjet", "cublas", "aten::mm", "aten::addmm",
                   "aten::linear")),
         ("copy/scatter", ("copy", "scatter", "index", "cat", "memcpy", "memset")),
         ("norm", ("rsqrt", "pow", "mean", "norm")),
         ("activation", ("silu", "gelu", "tanh", "sigmoid")),
         ("elementwise", ("elementwise", "reduce", "vectorized", "mul", "add", "neg", "unrolled", "triton_")))
ATTENTION_NAMES = ("_kernel", "_merge_kernel")  # kept for bench/profile_offload.py


def kind_of(name: str) -> str:
    if name in OUR_KERNELS:
        return OUR_KERNELS[name]
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def step_breakdown(model, adapter, *, batch: int, prompt_len: int, attention: str = "auto", steps: int = 5,
                   compile: bool = False, graph: bool = True) -> dict:
    """Profile `steps` eager decode steps of `adapter` at batch x prompt_len -> {"kinds": {kind: {"ms", "kernels"}},
    "total_ms", "kernels", "top": [[name, ms]], "graph_ms"}: per step; graph_ms (GPU only) is the same step replayed
    from a CUDA graph, median of 10 replays."""
    from torch.profiler import ProfilerActivity, profile

    spec, device = model.spec, model.device
    cuda = device.type == "cuda"
    max_tokens = prompt_len + 64
    cache = KVCache(spec, batch=batch, max_tokens=max_tokens, dtype=model.dtype, device=device)
    attend, why = choose_decode_attention(GenerationSettings(attention=attention), device=device,
                                          head_dim=spec.head_dim)
    ids = torch.randint(3, spec.vocab_size, (batch,), device=device)
    pos = torch.full((batch,), prompt_len, device=device)

    def step():
        return forward.decode_step(adapter, cache, ids, pos, kv_len=max_tokens, attend=attend)

    if compile:
        from engine.decode.compiled import CompiledDecode

        compiled = CompiledDecode(adapter, attend)

        def step():  # noqa: F811 - the compiled step replaces the eager one
            return compiled(cache, ids, pos)

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    per_kind_us, per_kernel, count = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if cuda != on_device or (not cuda and event.cpu_parent is not None):
            continue  # GPU: kernels only; CPU: top-level ops only (their children would count twice)
        us = (event.device_time_total if cuda else event.cpu_time_total) / steps
        per_kind_us[kind_of(event.name)] += us
        per_kernel[event.name] += us
        count[kind_of(event.name)] += 1 / steps
    total_us = sum(per_kind_us.values())
    result = {"attention": why, "compiled": compile, "total_ms": total_us / 1e3, "kernels": sum(count.values()),
              "kinds": {kind: {"ms": us / 1e3, "kernels": count[kind]} for kind, us in per_kind_us.most_common()},
              "top": [[name, us / 1e3] for name, us in per_kernel.most_common(15)], "graph_ms": None}
    if cuda and graph:
        graphed = forward.GraphedDecode(lambda token_ids, positions: step(), batch=batch, device=device,
                                        scratch_position=max_tokens - 1)
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphed.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        result["graph_ms"] = statistics.median(times)
        del graphed
    return result


def format_breakdown(b: dict, title: str) -> str:
    lines = [title, "| kind | ms/step | % | kernels/step |", "|---|---|---|---|"]
    for kind, v in b["kinds"].items():
        share = 100 * v["ms"] / max(b["total_ms"], 1e-9)
        lines.append(f"| {kind} | {v['ms']:.3f} | {share:.1f} | {v['kernels']:.0f} |")
    lines.append(f"| total | {b['total_ms']:.3f} | 100 | {b['kernels']:.0f} |")
    if b.get("graph_ms") is not None:
        gap = b["graph_ms"] - b["total_ms"]
        lines.append(f"\nCUDA-graph replay of the same step: {b['graph_ms']:.3f} ms ({gap:+.3f} ms against the "
                     f"kernels' sum: launch gaps, {1e3 * gap / max(b['kernels'], 1):.2f} µs per kernel)")
    lines.append("")
    lines += [f"{ms:8.3f} ms  {name[:110]}" for name, ms in b["top"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-2-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--compile", action="store_true", help="profile the compiled step (torch.compile)")
    parser.add_argument("--fused", action="store_true", help="profile the fast adapter (engine/fast)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device, dtype="bfloat16" if device == "cuda" else "float32")
    adapter = model.adapter
    if args.fused:
        from engine.fast import fuse

        adapter = fuse(adapter)
    b = step_breakdown(model, adapter, batch=args.batch, prompt_len=args.prompt_len, attention=args.attention,
                       steps=args.steps, compile=args.compile)
    how = ("compiled" if args.compile else "eager") + (", fused" if args.fused else "")
    print(format_breakdown(b, f"{args.model} B{args.batch} P{args.prompt_len}, attention: {b['attention']}, {how}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
