"""From settings and the loaded model to a RunPlan: how many slots stay on the GPU, then the scheduler; and what a
run needs of GPU and host memory, checked before anything is allocated.

The GPU budget of a hybrid run is either given in GiB or taken from what is free once the weights are loaded, less
what the run itself needs besides the resident K/V: the staging of its offloaded slots and prefill's temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.adapters import ModelSpec
from engine.decode.forward import PREFILL_GROUP_TOKENS, PREFILL_SLICE_TOKENS
from engine.decode.attention import PREFILL_QUERY_BLOCK
from engine.errors import InvalidSettingsError, OutOfMemoryError
from engine import memory
from engine.offload.profiler import HardwareProfile, hardware_profile
from engine.offload.scheduler import ProjectionTimes, RunPlan, plan_run
from engine.settings import OffloadSettings

MARGIN_BYTES = 1 << 30  # on a GPU: allocator slack, cuBLAS workspaces, CUDA graphs' pools


def margin_bytes(device: torch.device) -> int:
    return MARGIN_BYTES if device.type == "cuda" else 0


def human_bytes(num_bytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{int(num_bytes)} B"


def kv_slot_bytes(spec: ModelSpec, *, batch: int) -> int:
    """K and V of one slot (token position) of every sequence, all layers."""
    return spec.kv_bytes_per_token * batch


def prefill_working_bytes(spec: ModelSpec, *, batch: int, prompt_tokens: int, host_kv_tokens: int = 0,
                          host_act_tokens: int = 0) -> int:
    """Peak bytes of prefill's temporaries (engine/decode/forward.py), besides the weights and the K/V destination:
    the batch's hidden state; one group of sequences' X, Q, K, V and attention output (twice: SDPA's output and
    its flattened copy); per-token stages over slices (fp32 norm temporaries, the MLP's three intermediates);
    soft-capped or windowed attention's fp32 scores of one query block; the RoPE tables; an offloaded run's
    assembly buffers for the host-bound K/V and activations of one layer (host_*_tokens slots of every sequence);
    the logits. What torch's allocator would report as allocated, not reserved."""
    s, d = spec, spec.dtype_bytes
    tokens = prompt_tokens
    group = min(batch, max(1, PREFILL_GROUP_TOKENS // max(1, tokens)))
    n = group * tokens
    q_width, kv_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    hidden = batch * tokens * s.hidden_size * d
    per_group = n * (s.hidden_size + 3 * q_width + 2 * kv_width) * d
    per_slice = min(batch * tokens, PREFILL_SLICE_TOKENS) * (3 * s.intermediate_size * d + 3 * s.hidden_size * 4)
    scores = 0
    if s.attn_softcap is not None or any(w is not None and w < tokens for w in s.windows):
        keys = tokens if s.attn_softcap is not None or not s.sliding_window else \
            min(tokens, s.sliding_window + PREFILL_QUERY_BLOCK)
        scores = 3 * group * s.num_heads * min(tokens, PREFILL_QUERY_BLOCK) * keys * 4
    rope = tokens * s.rotary_dims * (2 * d + 6 * 4) if s.positional == "rope" else 0
    assembly = batch * (host_kv_tokens * 2 * kv_width + host_act_tokens * s.hidden_size) * d
    logits = batch * s.vocab_size * (4 + d)
    return hidden + per_group + per_slice + scores + rope + assembly + logits


def staging_bytes(spec: ModelSpec, *, batch: int, staged_tokens: int, act_tokens: int) -> int:
    """Two layers of staging K/V over the offloaded slots, two of activations over the recompute range, the
    write-back buffers of every layer, and the recompute weight."""
    d = spec.dtype_bytes
    kv_slot = 2 * batch * spec.num_kv_heads * spec.head_dim * d
    act_slot = batch * spec.hidden_size * d
    weight = 2 * spec.num_kv_heads * spec.head_dim * spec.hidden_size * d if act_tokens else 0
    return 2 * max(1, staged_tokens) * kv_slot + 2 * act_tokens * act_slot \
        + spec.num_layers * (kv_slot + act_slot) + weight


def _recomputes(spec: ModelSpec, offload: OffloadSettings, max_tokens: int) -> bool:
    """Whether the run may keep activations for recomputation (sizes are counted as if every offloaded slot did)."""
    if spec.recompute_blocked(max_tokens) is not None:
        return False
    return offload.split != 0 and (not offload.auto_split or spec.act_to_kv_ratio < 1.0)


def _free_gpu(device: torch.device) -> tuple[int | None, int | None]:
    if device.type != "cuda":
        return None, None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def resident_tokens(spec: ModelSpec, offload: OffloadSettings, *, device: torch.device, batch: int,
                    prompt_tokens: int, new_tokens: int) -> tuple[int, str]:
    """-> (slots per sequence kept on the GPU, a line saying how the budget was set)."""
    max_tokens = prompt_tokens + new_tokens
    slot_bytes = kv_slot_bytes(spec, batch=batch)
    if offload.placement == "gpu":
        return max_tokens, "all K/V on the GPU"
    if offload.placement == "cpu":
        return 0, "all K/V in host memory"
    free, total = _free_gpu(device)
    if offload.gpu_kv_budget_gib is not None:
        budget = int(offload.gpu_kv_budget_gib * 2**30)
        if total is not None and budget > total:
            raise InvalidSettingsError(
                f"gpu_kv_budget_gib={offload.gpu_kv_budget_gib:g} is more than the whole GPU "
                f"({total / 2**30:.1f} GiB): give a budget below the free GPU memory, or None to size it automatically.")
        how = f"GPU KV budget {offload.gpu_kv_budget_gib:g} GiB (given)"
        tokens = min(max_tokens, budget // slot_bytes)
    elif free is None:  # no GPU: the "GPU" is host memory; keep half the cache resident so both paths run
        tokens = max_tokens // 2
        how = "no GPU: half of the slots resident (auto budget)"
    else:
        tokens, working = _auto_resident(spec, offload, free=free, batch=batch, prompt_tokens=prompt_tokens,
                                         new_tokens=new_tokens)
        how = (f"GPU KV budget {tokens * slot_bytes / 2**30:.1f} GiB (auto: {free / 2**30:.1f} GiB free less "
               f"{working / 2**30:.1f} GiB for staging, prefill and slack)")
    return tokens, f"{how}: {tokens} of {max_tokens} slots per sequence resident"


def _auto_resident(spec: ModelSpec, offload: OffloadSettings, *, free: int, batch: int, prompt_tokens: int,
                   new_tokens: int) -> tuple[int, int]:
    """The most resident slots g whose K/V, with the staging of the other S - g slots and prefill's temporaries,
    fit `free` -> (g, the bytes besides the resident K/V)."""
    max_tokens = prompt_tokens + new_tokens

    def besides(g: int) -> int:
        return _working(spec, offload, batch=batch, prompt_tokens=prompt_tokens, max_tokens=max_tokens, resident=g,
                        margin=MARGIN_BYTES)

    usable = int(free * memory.HEADROOM)
    lo, hi = 0, max_tokens
    while lo < hi:  # the largest g with g slots + besides(g) <= usable (besides shrinks as g grows)
        mid = (lo + hi + 1) // 2
        if mid * kv_slot_bytes(spec, batch=batch) + besides(mid) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo, besides(lo)


def _working(spec: ModelSpec, offload: OffloadSettings, *, batch: int, prompt_tokens: int, max_tokens: int,
             resident: int, margin: int) -> int:
    """GPU bytes an offloaded run needs besides its resident K/V."""
    offloaded = max_tokens - resident
    act = offloaded if _recomputes(spec, offload, max_tokens) else 0
    host_kv_prompt = max(0, prompt_tokens - resident)
    return (prefill_working_bytes(spec, batch=batch, prompt_tokens=prompt_tokens, host_kv_tokens=host_kv_prompt,
                                  host_act_tokens=min(act, host_kv_prompt))
            + staging_bytes(spec, batch=batch, staged_tokens=offloaded, act_tokens=act) + margin)


@dataclass(frozen=True)
class RunMemory:
    """What a run needs, beside the weights, in bytes: on the GPU (resident K/V, staging, prefill's temporaries,
    slack) and in host memory (the offloaded K/V and activations)."""

    gpu_bytes: int
    host_bytes: int
    kv_bytes: int  # all K/V of the run, wherever it lives


def run_memory(spec: ModelSpec, offload: OffloadSettings, *, batch: int, prompt_tokens: int, new_tokens: int,
               resident: int, margin: int = MARGIN_BYTES) -> RunMemory:
    max_tokens = prompt_tokens + new_tokens
    slot = kv_slot_bytes(spec, batch=batch)
    kv = max_tokens * slot
    if offload.placement == "gpu":
        gpu = kv + prefill_working_bytes(spec, batch=batch, prompt_tokens=prompt_tokens) + margin
        return RunMemory(gpu_bytes=gpu, host_bytes=0, kv_bytes=kv)
    offloaded = max_tokens - resident
    recomputes = _recomputes(spec, offload, max_tokens)
    # A slot's host copy is its K/V or its activations (the plan keeps K/V where any step copies, activations where
    # any step recomputes; both only for the slots in between): at most the larger of the two per slot.
    per_token = max(spec.kv_bytes_per_token, spec.act_bytes_per_token) if recomputes else spec.kv_bytes_per_token
    host = offloaded * batch * per_token
    gpu = resident * slot + _working(spec, offload, batch=batch, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                                     resident=resident, margin=margin)
    return RunMemory(gpu_bytes=gpu, host_bytes=host, kv_bytes=kv)


def check_run_fits(spec: ModelSpec, offload: OffloadSettings, *, device: torch.device, batch: int, prompt_tokens: int,
                   new_tokens: int, resident: int) -> RunMemory:
    """Refuse, before anything is allocated, a run whose K/V and buffers do not fit this GPU and this host, naming
    both memories and the largest batch and the longest context that would fit under the same placement."""
    need = run_memory(spec, offload, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                      resident=resident, margin=margin_bytes(device))
    if _shortfall(need, device):
        _refuse(spec, offload, need, device=device, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    return need


def _refuse(spec: ModelSpec, offload: OffloadSettings, need: RunMemory, *, device: torch.device, batch: int,
            prompt_tokens: int, new_tokens: int):
    short = _shortfall(need, device)
    fits = largest_fit(spec, offload, device=device, batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    on = "the GPU" if device.type == "cuda" else str(device)
    where = {"gpu": f"all on {on}", "cpu": "all in host memory", "hybrid": f"split between {on} and host"}
    raise OutOfMemoryError(
        f"K/V for batch {batch} x {prompt_tokens + new_tokens:,} tokens is {human_bytes(need.kv_bytes)}, "
        f"{where[offload.placement]} (placement {offload.placement!r}); the run needs {' and '.join(short)}. "
        f"{fits} Lower the batch or the context, or choose another placement ('hybrid' uses both memories).")


def _shortfall(need: RunMemory, device: torch.device) -> list[str]:
    """What `need` lacks on this machine (free GPU memory, available host memory, less the headroom kept for the
    rest of the process): empty when it fits. Without a GPU both parts live in host memory."""
    host = memory.available_bytes(torch.device("cpu"))
    host = None if host is None else int(host * memory.HEADROOM)
    if device.type != "cuda":
        total = need.gpu_bytes + need.host_bytes
        if host is not None and total > host:
            return [f"{human_bytes(total)} of host memory ({human_bytes(host)} usable)"]
        return []
    gpu = int(_free_gpu(device)[0] * memory.HEADROOM)
    short = []
    if need.gpu_bytes > gpu:
        short.append(f"{human_bytes(need.gpu_bytes)} of GPU memory ({human_bytes(gpu)} free on {device})")
    if host is not None and need.host_bytes > host:
        short.append(f"{human_bytes(need.host_bytes)} of host memory ({human_bytes(host)} available)")
    return short


def largest_fit(spec: ModelSpec, offload: OffloadSettings, *, device: torch.device, batch: int, prompt_tokens: int,
                new_tokens: int) -> str:
    """One sentence: the largest batch at this context, and the longest prompt at this batch, that fit by the
    estimate of run_memory (which counts each offloaded slot at the larger of its K/V and activations)."""
    def fits(b: int, prompt: int) -> bool:
        try:
            g, _ = resident_tokens(spec, offload, device=device, batch=b, prompt_tokens=prompt, new_tokens=new_tokens)
        except InvalidSettingsError:
            return False
        need = run_memory(spec, offload, batch=b, prompt_tokens=prompt, new_tokens=new_tokens, resident=g,
                          margin=margin_bytes(device))
        return not _shortfall(need, device)

    best_batch = _largest(lambda b: fits(b, prompt_tokens), batch - 1)
    best_prompt = _largest(lambda p: fits(batch, p), prompt_tokens - 1)
    parts = []
    parts.append(f"At {prompt_tokens + new_tokens:,} tokens batch {best_batch} would fit" if best_batch else
                 f"At {prompt_tokens + new_tokens:,} tokens not even batch 1 fits")
    parts.append(f"at batch {batch}, prompts of {best_prompt:,} tokens would" if best_prompt else
                 f"at batch {batch} no prompt length fits")
    return "; ".join(parts) + "."


def memory_fit(spec: ModelSpec, *, device: torch.device, context: int, new_tokens: int = 1,
               max_batch: int = 4096) -> str:
    """One line for the Model card: the K/V of a sequence at `context` tokens, and the largest batch each placement
    fits on this machine (GPU free memory with the weights loaded, host memory available), with what an automatic
    hybrid budget keeps on the GPU at that batch."""
    prompt = max(1, context - new_tokens)
    per_seq = spec.kv_bytes_per_token * context
    line = f"K/V {human_bytes(per_seq)} per sequence at {context:,} tokens"

    def fits(placement: str, batch: int) -> bool:
        offload = OffloadSettings(placement=placement)
        g, _ = resident_tokens(spec, offload, device=device, batch=batch, prompt_tokens=prompt, new_tokens=new_tokens)
        need = run_memory(spec, offload, batch=batch, prompt_tokens=prompt, new_tokens=new_tokens, resident=g,
                          margin=margin_bytes(device))
        return not _shortfall(need, device)

    if device.type != "cuda":
        host = memory.available_bytes(torch.device("cpu"))
        best = _largest(lambda b: fits("gpu", b), max_batch)
        return (f"{line}; no GPU: this machine's memory ({human_bytes(host or 0)} available) holds batch {best} at that "
                "context (offloaded placements keep both parts in the same memory here)")
    best = {placement: _largest(lambda b, p=placement: fits(p, b), max_batch) for placement in ("gpu", "cpu", "hybrid")}
    free = human_bytes(_free_gpu(device)[0])
    host = human_bytes(memory.available_bytes(torch.device("cpu")) or 0)
    hybrid = best["hybrid"]
    kept = ""
    if hybrid:
        g, _ = resident_tokens(spec, OffloadSettings(placement="hybrid"), device=device, batch=hybrid,
                               prompt_tokens=prompt, new_tokens=new_tokens)
        kept = f", keeping {g:,} of {context:,} slots per sequence on the GPU ({human_bytes(g * per_seq // context * hybrid)})"
    return (f"{line}. With {free} free on the GPU and {host} of host memory available: all K/V on the GPU fits batch "
            f"{best['gpu']}, all in host memory batch {best['cpu']}, hybrid (auto budget) batch {hybrid}{kept}")


def _largest(ok, upper: int) -> int:
    """The largest n in [1, upper] with ok(n) (ok monotone: true up to some n), or 0."""
    lo, hi = 0, max(0, upper)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def measured_projections(spec: ModelSpec, *, device: torch.device, batch: int, fused: bool = True,
                         gemm_plan=None) -> ProjectionTimes | None:
    """The run's projection GEMM times as measured on this device (engine/fast/plan.py's GEMM plan: `gemm_plan`, or
    the device's cached one), where the run uses the fast adapter (fused: on a CUDA device, a family that has one)
    and every one of its shapes at this batch was measured; else None, and the cost model estimates them from the
    copy bandwidth."""
    if not fused or device.type != "cuda" or not torch.cuda.is_available():  # (a plan for a device not here)
        return None
    from engine.fast.plan import projection_us

    found = projection_us(spec, batch, device, gemm_plan)
    return None if found is None else ProjectionTimes(layer_ms=found[0] * 1e-3, head_ms=found[1] * 1e-3)


def _gemm_note(projections: ProjectionTimes | None, *, batch: int, fused: bool) -> str:
    """Where a GPU plan's projection GEMM times come from, and how to get measured ones where they are estimated."""
    if projections is not None:
        return f"predicted steps: projection GEMMs from this GPU's measured GEMM plan at batch {batch}"
    if not fused:
        return "predicted steps: projection GEMMs estimated from the copy bandwidth (the plain adapter runs)"
    return (f"predicted steps: projection GEMMs estimated from the copy bandwidth (no GEMM plan measured at batch "
            f"{batch} on this GPU for this model's shapes; `python -m engine.fast.plan --model MODEL --rows {batch}` "
            "measures one, which the fast adapter then also runs)")


def plan_for(spec: ModelSpec, offload: OffloadSettings, *, device: torch.device, batch: int, prompt_tokens: int,
             new_tokens: int, profile: HardwareProfile | None = None, cuda_graphs: bool = True,
             fused: bool = True) -> RunPlan:
    """The run's plan: the resident range from the budget, the recompute/copy ranges from the scheduler. Refuses
    (OutOfMemoryError) a run that cannot fit this GPU and host before anything is allocated. fused: whether the
    run uses the fast adapter where there is one (the default settings do), so its measured GEMMs time the plan."""
    if profile is None:
        profile = hardware_profile(device)
    resident, how = resident_tokens(spec, offload, device=device, batch=batch, prompt_tokens=prompt_tokens,
                                    new_tokens=new_tokens)
    split = None if offload.auto_split else float(offload.split)
    blocked = spec.recompute_blocked(prompt_tokens + new_tokens)
    if blocked is not None and split:
        raise InvalidSettingsError(f"split={split:g} asks to recompute K/V, but {blocked}: use split 0 or 'auto' "
                                   "(which copies the K/V instead), or a shorter run.")
    projections = measured_projections(spec, device=device, batch=batch, fused=fused)
    plan = plan_run(spec, profile, placement=offload.placement, batch=batch, prompt_tokens=prompt_tokens,
                    new_tokens=new_tokens, resident_tokens=resident, split=split, chunk_tokens=offload.chunk_tokens,
                    budget_note=how, cuda_graphs=cuda_graphs, recompute_off_why=blocked, projections=projections)
    if device.type == "cuda":
        plan = replace(plan, gemm_note=_gemm_note(projections, batch=batch, fused=fused))
    check_plan_fits(spec, offload, plan, device=device)
    return plan


def plan_memory(spec: ModelSpec, plan: RunPlan, *, device: torch.device) -> RunMemory:
    """What an offloaded plan's store, staging and prefill take, from the plan's own ranges."""
    from engine.offload.store import store_sizes

    sizes = store_sizes(spec, plan, dtype_bytes=spec.dtype_bytes)
    host_kv_prompt = max(0, plan.prompt_tokens - max(plan.kv_range[0], plan.resident_tokens))
    host_act_prompt = max(0, min(plan.act_range[1], plan.prompt_tokens) - plan.act_range[0])
    prefill = prefill_working_bytes(spec, batch=plan.batch, prompt_tokens=plan.prompt_tokens,
                                    host_kv_tokens=host_kv_prompt, host_act_tokens=host_act_prompt)
    return RunMemory(gpu_bytes=sizes.gpu_bytes + prefill + margin_bytes(device), host_bytes=sizes.host_bytes,
                     kv_bytes=plan.max_tokens * kv_slot_bytes(spec, batch=plan.batch))


def check_plan_fits(spec: ModelSpec, offload: OffloadSettings, plan: RunPlan, *, device: torch.device) -> RunMemory:
    need = plan_memory(spec, plan, device=device)
    if _shortfall(need, device):
        _refuse(spec, offload, need, device=device, batch=plan.batch, prompt_tokens=plan.prompt_tokens,
                new_tokens=plan.max_tokens - plan.prompt_tokens)
    return need
