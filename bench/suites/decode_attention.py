"""Decode attention (one query token, bf16, D=128): our split-KV Triton kernel vs torch SDPA backends and FlashInfer.

Per shape: correctness first (fresh random inputs, poisoned output, vs the fp32 reference, full and
mixed lengths), then cold-L2 timings (buffer sets rotated, calls queued back to back). GB/s counts
K+V for the real lengths plus q and out; % is of the read-only bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
import warnings

import torch

from bench.report import Headline, Row, SuiteResult
from bench.timing import (cold_l2_num_sets, l2_cache_bytes, read_floor_ms, read_sweep_note, streaming_read_gb_s,
                          triton_read_gb_s)
from engine.gpu_timing import queued_median_ms

# (B, Hq, Hkv, S)
SHAPES = [(1, 32, 8, 32768), (1, 32, 32, 8192), (8, 32, 32, 16384), (32, 32, 32, 4096), (64, 32, 8, 4096),
          (128, 32, 8, 2048), (4, 40, 8, 8192)]
HEAD_DIM = 128
DTYPE = torch.bfloat16
DEVICE = "cuda"
MAX_REL_ERR = 1e-2
LONG_TOKENS = 32 * 1024  # B*S at or above this counts as "long" for the bandwidth headline
B1_LONG = (1, 32, 8, 32768)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeat", type=int, default=15, help="timed samples per variant (median reported)")
    parser.add_argument("--shapes", type=str, default=None, help="subset, e.g. '1,32,8,32768;32,32,32,4096'")
    parser.add_argument("--sweep", action="store_true", help="also time split/stage/tile/prefetch variants (tuning)")
    parser.add_argument("--sweep-budget-s", type=float, default=240.0, help="skip the sweep of later shapes after this long")


def _variants():
    """name -> decode_attention keyword arguments: the config, and how the splits are merged."""
    from kernels.decode_attention import DecodeAttentionConfig

    return {"ours auto": dict(config=DecodeAttentionConfig()),
            "ours auto, merge by launch": dict(config=DecodeAttentionConfig(), merge="launch"),
            "ours prefetch off": dict(config=DecodeAttentionConfig(prefetch="off")),
            "ours prefetch on d=1": dict(config=DecodeAttentionConfig(prefetch="on", prefetch_distance=1)),
            "ours prefetch on d=2": dict(config=DecodeAttentionConfig(prefetch="on", prefetch_distance=2))}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _make_sets(shape, num_sets: int, seed: int):
    batch, num_heads, num_kv_heads, seq_len = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    sets = []
    for _ in range(num_sets):
        q = torch.randn(batch, num_heads, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
        k = torch.randn(batch, num_kv_heads, seq_len, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
        v = torch.randn(batch, num_kv_heads, seq_len, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
        sets.append((q, k, v, torch.full((batch,), seq_len, dtype=torch.int32, device=DEVICE)))
    return sets


def _sdpa(backend_name: str, q, k, v, gqa_flag: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    with sdpa_kernel([backend]):
        kwargs = {"enable_gqa": True} if gqa_flag else {}
        return torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, **kwargs).squeeze(2)


def _check_shape(shape, variants, details: dict) -> dict[str, float]:
    """Correctness of every variant on fresh inputs: full lengths and mixed lengths; returns errors."""
    from kernels.decode_attention import decode_attention, decode_attention_reference

    batch = shape[0]
    (q, k, v, full), = _make_sets(shape, 1, seed=1234 + sum(shape))
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    mixed = torch.randint(1, shape[3] + 1, (batch,), device=DEVICE, dtype=torch.int32, generator=gen)
    mixed[0] = 1 if batch > 1 else mixed[0]
    errors = {}
    for lens_name, lens in (("full", full), ("mixed", mixed)):
        ref = decode_attention_reference(q.float(), k, v, lens)  # fp32 math, upcast one sequence at a time
        for name, kwargs in variants.items():
            out = torch.full_like(q, float("nan"))
            decode_attention(q, k, v, lens, out=out, **kwargs)
            errors[f"{name} [{lens_name}]"] = _rel_err(out, ref)
    details["rel_err"] = errors
    bad = {n: e for n, e in errors.items() if not e <= MAX_REL_ERR}
    if bad:
        raise AssertionError(f"{shape}: relative error above {MAX_REL_ERR}: {bad}")
    return errors


def _time_sdpa(shape, sets, num_sets, repeat, details, notes) -> dict[str, float | None]:
    from kernels.decode_attention import decode_attention_reference

    q, k, v, lens = sets[0]
    ref = decode_attention_reference(q[:1].float(), k[:1], v[:1], lens[:1])
    times: dict[str, float | None] = {}
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        label = backend.split("_")[0].lower()
        ran, why = None, ""
        for gqa_flag in ((True, False) if shape[1] != shape[2] else (False,)):
            try:
                with warnings.catch_warnings(record=True) as caught:  # torch says why a backend refuses in warnings
                    warnings.simplefilter("always")
                    try:
                        out = _sdpa(backend, q, k, v, gqa_flag)
                    except Exception as exc:
                        reasons = [str(w.message).strip().splitlines()[0] for w in caught]
                        raise RuntimeError("; ".join(reasons) or str(exc)) from exc
                torch.cuda.synchronize()
                err = _rel_err(out[:1], ref)
                if not err <= MAX_REL_ERR:
                    why = f"wrong result (rel err {err:.2g})"
                    continue
                ran = gqa_flag
                break
            except Exception as exc:  # noqa: BLE001 - a backend refusing a shape is a result
                why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if ran is None:
            times[label] = None
            notes.append(f"{shape}: SDPA {label} refused: {why}")
            continue
        times[label] = queued_median_ms(lambda i: _sdpa(backend, *sets[i][:3], ran), num_sets=num_sets, repeat=repeat)
        details.setdefault("sdpa_enable_gqa", {})[label] = ran
    return times


def _sweep(shape, sets, num_sets, repeat, num_sms) -> dict[str, float | str]:
    """Tuning: tile x warps x pipeline depth x splits (about 1, 2, 4 programs per SM) x merge, prefetch off (it never
    paid with a pipeline), beside the auto plan. More warps, deeper pipelines and more programs keep more bytes in
    flight per SM, which an under-occupied grid lacks; the in-kernel merge saves the second launch."""
    import kernels.decode_attention as kda

    batch, _, num_kv_heads, seq_len = shape
    rows = batch * num_kv_heads
    q, k, v, lens = sets[0]
    ref = kda.decode_attention_reference(q, k, v, lens)
    results: dict[str, float | str] = {}
    for block_n in (32, 64, 128):
        for per_sm in (1, 2, 4):
            num_splits = min(kda.MAX_SPLITS, max(1, round(per_sm * num_sms / rows)))
            base = kda.choose_launch(batch, num_kv_heads, seq_len, HEAD_DIM, num_sms,
                                     kda.DecodeAttentionConfig(prefetch="off", block_n=block_n, num_splits=num_splits))
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    plan = dataclasses.replace(base, num_warps=warps, num_stages=stages)
                    for merge in ("launch", "in-kernel"):
                        name = (f"block_n={block_n} splits={plan.num_splits} ({plan.programs_per_sm:.2f}/SM) "
                                f"warps={warps} stages={stages} merge={merge}")
                        try:
                            err = _rel_err(kda.decode_attention(q, k, v, lens, plan=plan, merge=merge), ref)
                            if not err <= MAX_REL_ERR:
                                results[name] = f"wrong: relative error {err:.3g}"
                                continue
                            results[name] = queued_median_ms(
                                lambda i: kda.decode_attention(*sets[i], plan=plan, merge=merge),
                                num_sets=num_sets, repeat=repeat)
                        except Exception as exc:  # noqa: BLE001 - a variant that does not compile is a result
                            results[name] = f"error: {str(exc).strip()[:200]}"
    return results


def sweep_table(details: dict, *, top: int = 8) -> str:
    """Markdown: per swept shape, its `top` fastest sweep variants beside ours auto and the best peer (µs)."""
    lines = ["| shape | variant | µs | vs ours auto | vs best peer |", "|---|---|---|---|---|"]
    for name, shape in details.get("shapes", {}).items():
        sweep = {k: v for k, v in shape.get("sweep_ms", {}).items() if isinstance(v, float)}
        if not sweep:
            continue
        ours = shape.get("ms", {}).get("ours auto")
        peer = shape.get("best_peer")
        peer_ms = shape.get("ms", {}).get(peer) if peer else None
        for variant, ms in sorted(sweep.items(), key=lambda kv: kv[1])[:top]:
            vs_auto = f"{ours / ms:.3f}x" if ours else "-"
            vs_peer = f"{peer_ms / ms:.3f}x ({peer})" if peer_ms else "-"
            lines.append(f"| {name} | {variant} | {ms * 1e3:.1f} | {vs_auto} | {vs_peer} |")
        failed = len(shape.get("sweep_ms", {})) - len(sweep)
        lines.append(f"| {name} | ({len(sweep)} variants timed{f', {failed} failed or wrong' if failed else ''}) | | | |")
    return "\n".join(lines)


def _graph_check(sets, **kwargs) -> str:
    """The launcher must be capturable in a CUDA graph (no host syncs, no data-dependent allocation), and replays
    must keep giving the eager result (the in-kernel merge's counters reset themselves)."""
    from kernels.decode_attention import decode_attention

    q, k, v, lens = sets[0]
    eager = decode_attention(q, k, v, lens, **kwargs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(q, k, v, lens, **kwargs)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_attention(q, k, v, lens, **kwargs)
    same = []
    for _ in range(3):
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        same.append(torch.equal(captured, eager))
    return "ok" if all(same) else f"mismatch on replays {[i for i, ok in enumerate(same) if not ok]}"


def _time_flashinfer(shape, sets, num_sets, repeat, details, notes) -> dict[str, float | None]:
    """FlashInfer's paged batch decode, without and with tensor cores, on a paged copy of the same K/V."""
    from bench.peers.flashinfer_decode import FlashInferDecode, flashinfer_version, page_kv
    from kernels.decode_attention import decode_attention_reference

    if flashinfer_version() is None:
        return {}
    paged = [page_kv(k, v, lens) for _, k, v, lens in sets]
    q, k, v, lens = sets[0]
    ref = decode_attention_reference(q.float(), k, v, lens)
    times: dict[str, float | None] = {}
    for label, tensor_cores in (("flashinfer", False), ("flashinfer tc", True)):
        try:
            t0 = time.perf_counter()
            peer = FlashInferDecode(paged[0], shape[1], use_tensor_cores=tensor_cores)
            out = peer.run(q, paged[0])
            torch.cuda.synchronize()
            details.setdefault("flashinfer_first_call_s", {})[label] = time.perf_counter() - t0  # JIT build included
            err = _rel_err(out, ref)
            details.setdefault("rel_err", {})[f"{label} [full]"] = err
            if not err <= MAX_REL_ERR:
                raise RuntimeError(f"wrong result (rel err {err:.2g})")
            times[label] = queued_median_ms(lambda i: peer.run(sets[i][0], paged[i]), num_sets=num_sets, repeat=repeat)
        except Exception as exc:  # noqa: BLE001 - a peer refusing a shape is a result
            times[label] = None
            notes.append(f"{shape}: {label} did not run: {type(exc).__name__}: {str(exc).strip()[:300]}")
    del paged
    return times


def run(args) -> SuiteResult:
    if not torch.cuda.is_available():
        raise SystemExit("decode_attention bench needs a CUDA GPU")
    from kernels.decode_attention import choose_launch, decode_attention

    shapes = SHAPES if not args.shapes else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    t_start = time.perf_counter()
    sum_gb_s, stream_gb_s = streaming_read_gb_s(), triton_read_gb_s()
    read_gb_s = max(sum_gb_s, stream_gb_s)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    variants = _variants()
    rows: list[Row] = []
    notes = [f"read-only ceiling {read_gb_s:.0f} GB/s, the faster of two reads measured in this run (Triton streaming "
             f"read over 4 GiB {stream_gb_s:.0f}, torch bf16 sum over 2 GiB {sum_gb_s:.0f}); L2 {l2_cache_bytes() >> 20} MiB",
             "times: median per call, buffer sets rotated (cold L2), calls queued back to back behind a GPU sleep",
             "ratio = best peer time (SDPA backends, FlashInfer) / our time (> 1: we are faster)", read_sweep_note()]
    details: dict = {"read_gb_s": read_gb_s, "stream_read_gb_s": stream_gb_s, "sum_read_gb_s": sum_gb_s,
                     "num_sms": num_sms, "shapes": {}}
    from bench.peers.flashinfer_decode import flashinfer_version

    from kernels.decode_plan import device_refusal

    if (no_prefetch := device_refusal("cuda")) is not None:
        notes.append(f"the 'prefetch on' rows run without it: {no_prefetch}")
    fi_version = flashinfer_version()
    details["flashinfer"] = fi_version
    notes.append(f"FlashInfer {fi_version}: BatchDecodeWithPagedKVCacheWrapper, HND pages of 16 tokens, planned once per shape"
                 if fi_version else "FlashInfer not installed on this machine: its rows are absent (README, Decode attention)")
    ratios, best_ratios, long_pcts, b1_cudnn, b1_floor_vs_cudnn, failed = [], [], [], None, None, False
    for shape in shapes:
        batch, num_heads, num_kv_heads, seq_len = shape
        name = f"B{batch} Hq{num_heads} Hkv{num_kv_heads} S{seq_len}"
        kv_bytes = 2 * batch * num_kv_heads * seq_len * HEAD_DIM * 2
        bytes_moved = kv_bytes + 2 * batch * num_heads * HEAD_DIM * 2
        shape_details: dict = {"bytes_moved": bytes_moved}
        details["shapes"][name] = shape_details
        try:
            _check_shape(shape, variants, shape_details)
        except Exception as exc:  # noqa: BLE001 - wrong or failing: recorded, the shape is not timed
            notes.append(f"FAILED correctness, not timed: {type(exc).__name__}: {str(exc)[:500]}")
            failed = True
            traceback.print_exc()
            continue
        # The floor for this shape: a streaming read of its K/V bytes, timed the way the kernels are.
        floor_ms, floor_config = read_floor_ms(kv_bytes, repeat=args.repeat)
        shape_details["read_floor"] = {"ms": floor_ms, "config": floor_config}
        num_sets = cold_l2_num_sets(kv_bytes)
        sets = _make_sets(shape, num_sets, seed=sum(shape))
        if shape == shapes[0]:
            try:
                details["cuda_graph_capture"] = _graph_check(sets)
                details["cuda_graph_capture_merge_in_kernel"] = _graph_check(sets, merge="in-kernel")
                details["cuda_graph_capture_merge_launch"] = _graph_check(sets, merge="launch")
            except Exception as exc:  # noqa: BLE001 - recorded, the timings still count
                details["cuda_graph_capture"] = f"failed: {str(exc).strip()[:300]}"
                notes.append(f"CUDA graph capture failed: {str(exc).strip()[:200]}")
        plan = choose_launch(batch, num_kv_heads, seq_len, HEAD_DIM, num_sms, variants["ours auto"]["config"])
        shape_details["auto_plan"] = dataclasses.asdict(plan)
        times: dict[str, float | None] = {}
        for variant, kwargs in variants.items():
            try:
                times[variant] = queued_median_ms(lambda i: decode_attention(*sets[i], **kwargs),
                                                    num_sets=num_sets, repeat=args.repeat)
            except Exception as exc:  # noqa: BLE001 - recorded; the headlines then leave this shape out
                times[variant] = None
                notes.append(f"{shape} {variant}: timing failed: {type(exc).__name__}: {str(exc)[:300]}")
        sdpa = _time_sdpa(shape, sets, num_sets, args.repeat, shape_details, notes)
        times.update({f"sdpa {k}": t for k, t in sdpa.items()})
        flashinfer = _time_flashinfer(shape, sets, num_sets, args.repeat, shape_details, notes)
        times.update(flashinfer)
        shape_details["ms"] = times
        shape_details["num_sets"] = num_sets
        if args.sweep and time.perf_counter() - t_start > args.sweep_budget_s:
            notes.append(f"{shape}: sweep skipped (time budget)")
        elif args.sweep:
            shape_details["sweep_ms"] = _sweep(shape, sets, num_sets, max(5, args.repeat // 2), num_sms)
            print(f"{name} sweep: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in shape_details["sweep_ms"].items()), flush=True)
        del sets
        torch.cuda.empty_cache()
        ran = {k: t for k, t in sdpa.items() if t is not None}
        best = min(ran, key=ran.get) if ran else None
        peers = {**{f"sdpa {k}": t for k, t in ran.items()}, **{k: t for k, t in flashinfer.items() if t is not None}}
        best_peer = min(peers, key=peers.get) if peers else None
        shape_details["best_peer"] = best_peer
        for variant, ms in times.items():
            gb_s = bytes_moved / (ms * 1e-3) / 1e9 if ms else None
            rows.append(Row(case=f"{name} · {variant}", ms=ms, bytes_moved=bytes_moved, gb_s=gb_s,
                            pct_roofline=100 * gb_s / read_gb_s if gb_s else None,
                            peer=best_peer if best_peer and variant.startswith("ours") else None,
                            peer_ms=peers[best_peer] if best_peer and variant.startswith("ours") else None))
        floor_gb_s = kv_bytes / (floor_ms * 1e-3) / 1e9
        rows.append(Row(case=f"{name} · read floor (streaming read of the K/V bytes)", ms=floor_ms, bytes_moved=kv_bytes,
                        gb_s=floor_gb_s, pct_roofline=100 * floor_gb_s / read_gb_s))
        ours = times["ours auto"]
        failed = failed or ours is None
        if ours and best_peer:
            notes.append(f"{name}: read floor {floor_ms * 1e3:.1f} µs ({floor_config}); ours auto "
                         f"{100 * floor_ms / ours:.0f} % of the floor's speed, {best_peer} "
                         f"{100 * floor_ms / peers[best_peer]:.0f} %; a kernel reading these bytes is at most "
                         f"{peers[best_peer] / floor_ms:.2f}x {best_peer}")
        if best and ours:
            ratios.append(ran[best] / ours)
        if best_peer and ours:
            best_ratios.append(peers[best_peer] / ours)
        if batch * seq_len >= LONG_TOKENS and ours:
            long_pcts.append(bytes_moved / (ours * 1e-3) / 1e9)  # GB/s; a % once the ceiling is final
        if shape == B1_LONG and sdpa.get("cudnn") and ours:
            b1_cudnn = sdpa["cudnn"] / ours
            b1_floor_vs_cudnn = sdpa["cudnn"] / floor_ms
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if v else f"{k} -" for k, v in times.items()) + f" | {plan.why}", flush=True)
    # The ceiling: the measured reads, or the fastest row if a kernel read faster (then say so): no % above 100.
    fastest = max((row.gb_s for row in rows if row.gb_s), default=0.0)
    if fastest > read_gb_s:
        notes.append(f"a row read {fastest:.0f} GB/s, above the measured reads' {read_gb_s:.0f}: the ceiling is "
                     "raised to it, so every % below is of the fastest read this run saw")
        read_gb_s = fastest
        rows = [dataclasses.replace(row, pct_roofline=100 * row.gb_s / read_gb_s if row.gb_s else None) for row in rows]
    details["ceiling_gb_s"] = read_gb_s
    long_pcts = [100 * gb_s / read_gb_s for gb_s in long_pcts]
    headlines = []
    if failed:
        notes.append("no headlines: a shape failed its correctness check or its timing")
    elif ratios:
        headlines.append(Headline("decode_attn_min_ratio_vs_sdpa", min(ratios), "x (best SDPA ms / ours auto ms, min over shapes; target >= 1.0)", "torch SDPA best backend"))
    if best_ratios and not failed:
        headlines.append(Headline("decode_attn_min_ratio_vs_best", min(best_ratios),
                                  "x (best peer ms / ours auto ms, min over shapes; peers: every SDPA backend"
                                  + (f" and FlashInfer {fi_version}" if fi_version else ", FlashInfer absent") + "; target >= 1.0)",
                                  "best of SDPA and FlashInfer"))
    if long_pcts and not failed:
        headlines.append(Headline("decode_attn_min_pct_read_bw_long", min(long_pcts), "% of read BW (min over B*S >= 32K; target >= 90)", f"read-only streaming {read_gb_s:.0f} GB/s"))
    if b1_cudnn is not None and not failed:
        headlines.append(Headline("decode_attn_b1_long_ratio_vs_cudnn", b1_cudnn, "x (cuDNN ms / ours auto ms at B1 Hq32 Hkv8 S32768; target >= 1.15)", "torch SDPA cuDNN"))
        headlines.append(Headline("decode_attn_b1_long_floor_vs_cudnn", b1_floor_vs_cudnn,
                                  "x (cuDNN ms / read-floor ms at B1 Hq32 Hkv8 S32768: the most any kernel that reads "
                                  "the K/V once could reach against cuDNN)", "torch SDPA cuDNN"))
    elif any(s == B1_LONG for s in shapes):
        notes.append("decode_attn_b1_long_ratio_vs_cudnn not reported: cuDNN SDPA did not run on B1 Hq32 Hkv8 S32768")
    tables = [sweep_table(details)] if args.sweep else []
    return SuiteResult(suite="decode_attention", rows=rows, headlines=headlines, notes=notes, details=details,
                       tables=tables)


if __name__ == "__main__":  # python -m bench.suites.decode_attention == python -m bench decode_attention
    import sys

    from bench.__main__ import main

    raise SystemExit(main(["decode_attention", *sys.argv[1:]]))
