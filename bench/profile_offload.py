"""Where an offloaded decode step's time goes: host enqueue time against GPU step time, and GPU kernels by kind.

    python bench/profile_offload.py [--model synthetic:llama-2-7b] [--batch 8] [--prompt-len 2048]
        [--configs "1.0:256,1.0:1024,auto:1024,0.0:1024"]

Each config is split:chunk_tokens, all K/V on the CPU. For each: the median GPU step time over --steps decode
steps, the host time to enqueue one step (the Python side of the runtime; a step cannot be faster), and the
scheduler's prediction; then, for the first config, GPU kernel time per step grouped by kind.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.profile_decode import kind_of  # noqa: E402
from engine import GenerationSettings, load_model  # noqa: E402
from engine.decode import forward  # noqa: E402
from engine.decode.backend import choose_decode_attention  # noqa: E402
from engine.offload.runtime import OffloadRuntime  # noqa: E402
from engine.offload.store import OffloadStore  # noqa: E402
from engine.offload.placement import plan_for  # noqa: E402
from engine.settings import OffloadSettings  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synthetic:llama-2-7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--configs", default="1.0:256,1.0:1024,auto:256,auto:1024,0.0:1024")
    parser.add_argument("--placement", default="cpu")
    args = parser.parse_args(argv)
    model = load_model(args.model, device="cuda", dtype="bfloat16")
    spec, device = model.spec, model.device
    attend, _ = choose_decode_attention(GenerationSettings(), device=device, head_dim=spec.head_dim,
                                        sliding_window=spec.sliding_window)
    batch, plen = args.batch, args.prompt_len
    ids = torch.randint(3, spec.vocab_size, (batch, plen), device=device)
    lens = torch.full((batch,), plen, device=device)
    print(f"{'config':>14} {'gpu ms':>8} {'host ms':>8} {'pred ms':>8} {'floor ms':>8}  split")
    profiled = False
    for config in args.configs.split(","):
        split, chunk = config.split(":")
        offload = OffloadSettings(placement=args.placement, split=split if split == "auto" else float(split),
                                  chunk_tokens=int(chunk))
        plan = plan_for(spec, offload, device=device, batch=batch, prompt_tokens=plen, new_tokens=args.steps + 2)
        store = OffloadStore(spec, plan, dtype=model.dtype, device=device)
        runtime = OffloadRuntime(model.adapter, plan, store, attend, prompt_lens=[plen] * batch)
        forward.prefill(model.adapter, runtime, ids, lens)
        runtime.finish_prefill()
        token = ids[:, -1].clone()
        gpu_ms, host_ms = [], []
        for step in range(args.steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            positions = torch.full((batch,), plen + step, device=device)
            runtime.decode(token, positions, plen + step + 1)
            host_ms.append((time.perf_counter() - start) * 1e3)
            torch.cuda.synchronize()
            gpu_ms.append((time.perf_counter() - start) * 1e3)
        step_plan = plan.step(plen + 1)
        print(f"{config:>14} {statistics.median(gpu_ms[1:]):8.2f} {statistics.median(host_ms[1:]):8.2f} "
              f"{step_plan.predicted_ms:8.2f} {step_plan.pcie_floor_ms:8.2f}  {step_plan.split:.2f}  "
              f"layer {step_plan.layer}", flush=True)
        if not profiled:
            profiled = True
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for step in range(2):
                    positions = torch.full((batch,), plen + step, device=device)
                    runtime.decode(token, positions, plen + step + 1)
                torch.cuda.synchronize()
            per_kind, per_kernel = collections.Counter(), collections.Counter()
            for event in prof.events():
                if event.device_type == torch.autograd.DeviceType.CUDA:
                    per_kind[kind_of(event.name)] += event.device_time / 2
                    per_kernel[event.name[:90]] += event.device_time / 2
            print(f"  GPU time per step by kind ({config}): " +
                  ", ".join(f"{k} {us / 1e3:.2f} ms" for k, us in per_kind.most_common()))
            for name, us in per_kernel.most_common(12):
                print(f"    {us / 1e3:8.3f} ms  {name}")
        runtime.release()
        del runtime, store
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
