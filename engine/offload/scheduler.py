"""Choose, per decode step, which offloaded tokens are recomputed, which are copied, which stay on the GPU.

Every layer's K/V for slots [0, s) is needed each step. Slots [0, g) live on the GPU (hybrid); slots [g, g + r)
are recomputed from attention-input activations copied over PCIe (KVPR); slots [g + r, s) are copied as K/V.
Shipping one token's activations costs h values against 2 * kv_heads * head_dim for its K/V, plus a GEMM to
rebuild K/V, which runs while the link carries what follows. The scheduler predicts the step time for every
candidate r by simulating that pipeline with this machine's measured speeds (engine/offload/profiler.py) and keeps the
fastest; a manual split fixes r instead. Plans hold no tensors: the runtime (engine/offload/runtime.py)
executes them and the UI plots them.

The paper's rule (KVPR, arXiv 2411.17089) is kept as `paper_split`, for comparison: a serial formula with fixed
A100 constants, chosen once per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.adapters import ModelSpec
from engine.offload.profiler import HardwareProfile

PAPER_PCIE_GB_S = 32.0  # the paper's fixed A100 constants
PAPER_TFLOP_S = 312.0
EAGER_OPS_PER_LAYER = 30  # kernels an uncaptured decode layer enqueues (norms, projections, RoPE, MLP, ...)
GRAPH_LAUNCHES_PER_LAYER = 2  # the runtime's captured attend and MLP graphs (engine/decode/layer_graphs.py)
GEMV_EFFICIENCY = 0.8  # decode projections read their weights at about this fraction of the copy bandwidth
# With measured projection times (ProjectionTimes), the small kernels beside them are counted apart: the fast
# adapter's two residual-add + norm kernels and its RoPE (which writes the new K/V), 2.5-2.6 µs each replayed in a
# CUDA graph in the H200 profile of an eager llama-2-7b B8 step (bench/results/decode.json, 2026-12-01).
SMALL_KERNELS_PER_LAYER = 3
SMALL_KERNEL_US = 2.5


@dataclass(frozen=True)
class ProjectionTimes:
    """One decode step's projection GEMMs at the run's batch, measured on the device: engine/fast/plan.py's GEMM
    plan, the launches the fast adapter runs. The cost model then takes these in place of the weight bytes over
    GEMV_EFFICIENCY x the copy bandwidth."""

    layer_ms: float  # one layer's q/k/v, output, gate/up (with the activation) and down projections
    head_ms: float  # the LM head


@dataclass(frozen=True)
class LayerTimes:
    """Predicted milliseconds of one layer of one decode step, per lane."""

    act_copy_ms: float  # H2D of the recompute range's activations
    kv_copy_ms: float  # H2D of the transfer range's K/V
    recompute_ms: float  # K/V GEMMs (+ bias, k-norm, RoPE) over the recompute range
    attention_ms: float  # decode attention over all slots (resident in place, staged from staging)
    other_ms: float  # projections of the new token, output projection, MLP

    @property
    def copy_ms(self) -> float:
        return self.act_copy_ms + self.kv_copy_ms

    @property
    def compute_ms(self) -> float:
        return self.recompute_ms + self.attention_ms + self.other_ms


@dataclass(frozen=True)
class StepPlan:
    """One decode step over slots [0, seq_len): which ranges go where, and what it should cost."""

    seq_len: int  # slots attended (the longest sequence's length, new token included)
    resident_tokens: int  # g: slots [0, g) are on the GPU
    recompute_tokens: int  # r: slots [g, g + r) are rebuilt from activations
    chunk_tokens: int
    layer: LayerTimes
    predicted_ms: float  # the whole step, simulated
    pcie_floor_ms: float  # bytes this plan moves over PCIe / the best measured H2D bandwidth
    h2d_bytes: int  # per step, all layers
    d2h_bytes: int  # write-back of the new slot of every sequence, all layers
    reason: str

    @property
    def offloaded_tokens(self) -> int:
        """Old tokens (before the new one) that live in host memory."""
        return max(0, self.seq_len - 1 - self.resident_tokens)

    @property
    def transfer_tokens(self) -> int:
        return self.offloaded_tokens - self.recompute_tokens

    @property
    def split(self) -> float:
        return self.recompute_tokens / self.offloaded_tokens if self.offloaded_tokens else 0.0

    @property
    def resident_range(self) -> tuple[int, int]:
        return 0, min(self.resident_tokens, self.seq_len)

    @property
    def recompute_range(self) -> tuple[int, int]:
        return self.resident_tokens, self.resident_tokens + self.recompute_tokens

    @property
    def transfer_range(self) -> tuple[int, int]:
        start = self.resident_tokens + self.recompute_tokens
        return start, max(start, self.seq_len - 1)

    @property
    def chunks(self) -> tuple[tuple[int, int], ...]:
        """Recompute range cut into chunks of chunk_tokens slots (the last may be shorter)."""
        lo, hi = self.recompute_range
        return tuple((c, min(c + self.chunk_tokens, hi)) for c in range(lo, hi, self.chunk_tokens))


@dataclass(frozen=True)
class RunPlan:
    """A whole run's plan: one StepPlan per decode length, and what must be stored where for all of them."""

    placement: str
    batch: int
    prompt_tokens: int  # the longest prompt
    max_tokens: int  # slots per sequence (prompt + new tokens)
    resident_tokens: int  # g, fixed for the run (the GPU budget)
    act_range: tuple[int, int]  # slots whose activations are kept in host memory
    kv_range: tuple[int, int]  # slots whose K/V are kept in host memory
    steps: tuple[StepPlan, ...]  # steps[i] attends seq_len = prompt_tokens + 1 + i
    reason: str
    gpu_budget_note: str = ""
    notes: tuple[str, ...] = field(default=())
    gemm_note: str = ""  # where the predictions' projection GEMM times come from, on a GPU

    def step(self, seq_len: int) -> StepPlan:
        index = seq_len - self.prompt_tokens - 1
        if not 0 <= index < len(self.steps):
            raise IndexError(f"no plan for seq_len {seq_len}: the run covers {self.prompt_tokens + 1}.."
                             f"{self.prompt_tokens + len(self.steps)}")
        return self.steps[index]

    @property
    def recompute_enabled(self) -> bool:
        return self.act_range[1] > self.act_range[0]


@dataclass(frozen=True)
class CostModel:
    """Bytes and FLOPs of one layer, from the model's shape; times from the hardware profile."""

    spec: ModelSpec
    profile: HardwareProfile
    batch: int
    cuda_graphs: bool = True  # the runtime replays each layer's new-token compute as CUDA graphs
    projections: ProjectionTimes | None = None  # measured GEMM times, where the device's GEMM plan has them

    @property
    def act_bytes_per_slot(self) -> int:  # one slot of every sequence, one layer
        return self.batch * self.spec.hidden_size * self.spec.dtype_bytes

    @property
    def kv_bytes_per_slot(self) -> int:
        return self.batch * 2 * self.spec.num_kv_heads * self.spec.head_dim * self.spec.dtype_bytes

    @property
    def layer_weight_bytes(self) -> int:
        s = self.spec
        embeddings = (2 if s.family == "llama" else 1) * s.vocab_size * s.hidden_size
        return (s.num_params - embeddings) * s.dtype_bytes // s.num_layers

    def copy_ms(self, num_bytes: float) -> float:
        return num_bytes / (self.profile.h2d_gb_s(num_bytes) * 1e9) * 1e3 if num_bytes > 0 else 0.0

    def recompute_ms(self, num_slots: int) -> float:
        if num_slots <= 0:
            return 0.0
        rows, kv_out = num_slots * self.batch, 2 * self.spec.num_kv_heads * self.spec.head_dim
        flops = 2 * rows * self.spec.hidden_size * kv_out
        gemm_ms = flops / (self.profile.gemm_tflop_s(rows, self.spec.hidden_size, kv_out) * 1e12) * 1e3
        # The GEMMs write K/V into staging themselves; RoPE in place passes over K about twice (read + write).
        elementwise_ms = 2 * num_slots * self.kv_bytes_per_slot / (self.profile.hbm_copy_gb_s * 1e9) * 1e3
        return gemm_ms + elementwise_ms + 8 * self.profile.launch_us * 1e-3

    def attention_ms(self, seq_len: int, resident: int) -> float:
        """Decode attention reads every slot once, resident ones in place, staged ones from staging; a second
        segment costs one more kernel launch and the merge."""
        read_ms = seq_len * self.kv_bytes_per_slot / (self.profile.attention_gb_s * 1e9) * 1e3
        segments = (resident > 0) + (seq_len > resident)
        return read_ms + (segments - 1) * 2 * self.profile.launch_us * 1e-3

    def other_ms(self) -> float:
        """New token's projections, output projection and MLP: weight reads, or the host's launches if slower."""
        if self.projections is not None:
            weights_ms = self.projections.layer_ms + SMALL_KERNELS_PER_LAYER * SMALL_KERNEL_US * 1e-3
        else:
            weights_ms = self.layer_weight_bytes / (GEMV_EFFICIENCY * self.profile.hbm_copy_gb_s * 1e9) * 1e3
        launches = GRAPH_LAUNCHES_PER_LAYER if self.cuda_graphs else EAGER_OPS_PER_LAYER
        return max(weights_ms, launches * self.profile.launch_us * 1e-3)

    def head_ms(self) -> float:
        """Embedding, final norm, LM head and sampling, once per step."""
        s = self.spec
        lm_head_ms = self.projections.head_ms if self.projections is not None else \
            s.vocab_size * s.hidden_size * s.dtype_bytes / (GEMV_EFFICIENCY * self.profile.hbm_copy_gb_s * 1e9) * 1e3
        return lm_head_ms + 10 * self.profile.launch_us * 1e-3


def simulate_step(cost: CostModel, *, seq_len: int, resident: int, recompute: int, chunk_tokens: int
                  ) -> tuple[float, LayerTimes]:
    """Predicted step time (ms) of the overlapped runtime, and one layer's lane times.

    Two resources: the H2D link (activation chunks, then K/V, layer after layer) and the compute stream. Layer i
    computes chunk c once it has arrived, attends once its K/V have arrived; its staging slot (two, used
    alternately) is free for layer i + 2's copies once layer i has attended.
    """
    offloaded = max(0, seq_len - 1 - resident)
    recompute = min(recompute, offloaded)
    chunks = [min(chunk_tokens, recompute - c) for c in range(0, recompute, chunk_tokens)]
    act_ms = [cost.copy_ms(n * cost.act_bytes_per_slot) for n in chunks]
    rec_ms = [cost.recompute_ms(n) for n in chunks]
    kv_ms = cost.copy_ms((offloaded - recompute) * cost.kv_bytes_per_slot)
    att_ms, other_ms = cost.attention_ms(seq_len, resident), cost.other_ms()
    # Within a layer, chunk k arrives at link_start + A_k (A_k: activation copy time of chunks 0..k) and its
    # recompute ends no earlier than arrival + the recompute of chunks k..n-1 (S_k): compute after the chunks is
    # max(compute + sum(rec), link_start + max_k(A_k + S_k)). The max is the same for every layer: O(1) per layer.
    act_total, rec_total = sum(act_ms), sum(rec_ms)
    lead, arrived_ms, after_ms = 0.0, 0.0, 0.0
    for n in range(len(chunks)):
        arrived_ms += act_ms[n]
        lead = max(lead, arrived_ms + rec_total - after_ms)
        after_ms += rec_ms[n]
    link = compute = 0.0
    slot_free = [0.0, 0.0]
    for layer in range(cost.spec.num_layers):
        link = max(link, slot_free[layer % 2])
        if chunks:
            compute = max(compute + rec_total, link + lead)
        link += act_total + kv_ms
        compute = max(compute, link) + att_ms
        slot_free[layer % 2] = compute
        compute += other_ms
    times = LayerTimes(act_copy_ms=sum(act_ms), kv_copy_ms=kv_ms, recompute_ms=sum(rec_ms), attention_ms=att_ms,
                       other_ms=other_ms)
    return compute + cost.head_ms(), times


def gqa_note(spec: ModelSpec) -> str:
    ratio = spec.act_to_kv_ratio
    kind = "GQA" if spec.num_kv_heads < spec.num_heads else "MHA"
    return f"{kind}: activations are {ratio:.2f}x the KV per token"


COARSE_CANDIDATES = 32  # recompute ranges tried first on long sequences; the best one's neighbourhood is then scanned


def _best_recompute(step_ms, *, offloaded: int, chunk_tokens: int) -> tuple[float, int, float]:
    """The recompute range r (a chunk multiple, or all offloaded tokens) with the least predicted step time
    -> (its ms, r, the ms of r = 0). Long sequences have thousands of chunk multiples: a coarse grid first, then
    every multiple around its best (the step time falls, then rises, with r)."""
    grid = sorted({*range(0, offloaded + 1, chunk_tokens), offloaded})
    stride = max(1, -(-len(grid) // COARSE_CANDIDATES))
    timed = {i: step_ms(grid[i]) for i in sorted({*range(0, len(grid), stride), len(grid) - 1})}
    best = min(timed, key=lambda i: (timed[i], i))
    for i in range(max(0, best - stride), min(len(grid), best + stride + 1)):
        if i not in timed:
            timed[i] = step_ms(grid[i])
    best = min(timed, key=lambda i: (timed[i], i))
    return timed[best], grid[best], timed[0]


def plan_step(cost: CostModel, *, seq_len: int, resident: int, chunk_tokens: int, split: float | None,
              recompute_off_why: str | None = None) -> StepPlan:
    """The plan for one step: `split` None chooses r by simulation, a number fixes r = split * offloaded.
    `recompute_off_why`: recomputation cannot be exact for this run (auto then copies everything)."""
    spec = cost.spec
    offloaded = max(0, seq_len - 1 - resident)
    note = gqa_note(spec)
    if offloaded == 0:
        r, reason = 0, "every token is resident on the GPU"
    elif recompute_off_why is not None and not split:
        r, reason = 0, f"recompute off: {recompute_off_why}"
    elif split is not None:
        r, reason = round(split * offloaded), f"manual split {split:g}"
    elif spec.act_to_kv_ratio >= 1.0:
        r, reason = 0, f"{note} — recompute off (shipping activations would move more bytes than the K/V)"
    else:
        def step_ms(c: int) -> float:
            return simulate_step(cost, seq_len=seq_len, resident=resident, recompute=c, chunk_tokens=chunk_tokens)[0]

        best_ms, r, full_ms = _best_recompute(step_ms, offloaded=offloaded, chunk_tokens=chunk_tokens)
        reason = (f"{note} — recompute {r}/{offloaded} offloaded tokens: predicted {best_ms:.1f} ms vs "
                  f"{full_ms:.1f} ms copying all K/V")
    predicted, layer = simulate_step(cost, seq_len=seq_len, resident=resident, recompute=r, chunk_tokens=chunk_tokens)
    h2d = spec.num_layers * (r * cost.act_bytes_per_slot + (offloaded - r) * cost.kv_bytes_per_slot)
    d2h = 0  # set by plan_run, which knows which slots the run keeps in host memory
    floor = h2d / (cost.profile.peak_h2d_gb_s * 1e9) * 1e3
    return StepPlan(seq_len=seq_len, resident_tokens=resident, recompute_tokens=r, chunk_tokens=chunk_tokens,
                    layer=layer, predicted_ms=predicted, pcie_floor_ms=floor, h2d_bytes=h2d, d2h_bytes=d2h,
                    reason=reason)


def plan_run(spec: ModelSpec, profile: HardwareProfile, *, placement: str, batch: int, prompt_tokens: int,
             new_tokens: int, resident_tokens: int, split: float | None, chunk_tokens: int,
             budget_note: str = "", cuda_graphs: bool = True, recompute_off_why: str | None = None,
             projections: ProjectionTimes | None = None) -> RunPlan:
    """Plans for every decode step of a run, and the host storage they need (activations where any step
    recomputes, K/V where any step copies). projections: the run's measured GEMM times, where known."""
    if placement == "gpu":
        resident_tokens = prompt_tokens + new_tokens
    cost = CostModel(spec=spec, profile=profile, batch=batch, cuda_graphs=cuda_graphs and profile.device_type == "cuda",
                     projections=projections)
    max_tokens = prompt_tokens + new_tokens
    resident = min(resident_tokens, max_tokens)
    steps = tuple(plan_step(cost, seq_len=s, resident=resident, chunk_tokens=chunk_tokens, split=split,
                            recompute_off_why=recompute_off_why)
                  for s in range(prompt_tokens + 1, max_tokens + 1))
    act_hi = max((p.recompute_range[1] for p in steps if p.recompute_tokens), default=resident)
    kv_lo = min((p.recompute_range[1] for p in steps), default=resident)
    act_range = (resident, max(resident, act_hi))
    kv_range = (min(max(resident, kv_lo), max_tokens), max_tokens)
    # The write-back of each step's new slot: its K/V where the run keeps K/V, its activations where it keeps them.
    slot_kv, slot_act = spec.num_layers * cost.kv_bytes_per_slot, spec.num_layers * cost.act_bytes_per_slot
    steps = tuple(replace(p, d2h_bytes=(slot_kv if kv_range[0] <= p.seq_len - 1 < kv_range[1] else 0)
                          + (slot_act if act_range[0] <= p.seq_len - 1 < act_range[1] else 0)) for p in steps)
    first = steps[0]
    reason = first.reason if len(steps) == 1 or split is not None else \
        f"{first.reason} (first step; re-chosen every step as the sequences grow)"
    return RunPlan(placement=placement, batch=batch, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                   resident_tokens=resident, act_range=act_range, kv_range=kv_range, steps=steps, reason=reason,
                   gpu_budget_note=budget_note)


def paper_split(spec: ModelSpec, *, batch: int) -> float:
    """KVPR's own choice, l*/s = 1 / (1 + h * B / F) in the paper's per-token units, with its fixed A100
    PCIe bandwidth B and GEMM throughput F: what the serial formula t(l) = act(l) + max(rec(l), kv(s - l))
    gives. Here for comparison only."""
    act_s = spec.hidden_size * spec.dtype_bytes / (PAPER_PCIE_GB_S * 1e9)  # per token and layer
    kv_s = 2 * spec.num_kv_heads * spec.head_dim * spec.dtype_bytes / (PAPER_PCIE_GB_S * 1e9)
    rec_s = 2 * spec.hidden_size * 2 * spec.num_kv_heads * spec.head_dim / (PAPER_TFLOP_S * 1e12)
    # act(l) + max(rec(l), kv(s - l)) is smallest where rec(l) = kv(s - l) if the act term does not dominate.
    if act_s >= kv_s:
        return 0.0
    return kv_s / (rec_s + kv_s)


def pcie_floor_ms(spec: ModelSpec, profile: HardwareProfile, *, batch: int, offloaded_tokens: int) -> float:
    """Copying all offloaded K/V once, at the best measured H2D bandwidth: the split-0 floor."""
    cost = CostModel(spec=spec, profile=profile, batch=batch)
    return spec.num_layers * offloaded_tokens * cost.kv_bytes_per_slot / (profile.peak_h2d_gb_s * 1e9) * 1e3


