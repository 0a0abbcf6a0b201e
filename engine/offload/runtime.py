"""Execute a RunPlan: prefill into the offloaded store, then decode steps that stream K/V back per layer.

A decode step is built from five verbs per layer, each a few tensor operations:
    load_act(layer, chunk)   H2D: the recompute range's activations, chunk by chunk
    load_kv(layer)           H2D: the transfer range's K/V
    recompute_kv(layer, chunk)  K, V = project_kv(X) with bias, k-norm and RoPE at the slots' positions
    attend(layer)            the new token: projections, resident K/V, attention, output projection, MLP
    store(layer)             D2H: the new token's K/V and activations, written back for later steps
`_sync` runs them in order on one stream; `_overlapped` puts the copies on an H2D and a D2H
stream, two layers of staging in flight, with events where one verb needs another's result. Both give the
same tokens (tests/test_offload.py). The runtime decides nothing: ranges and chunks come from the plan.
"""

from __future__ import annotations

import contextlib
import os
from itertools import groupby

import torch

from engine.adapters import DecoderAdapter
from engine.forward import DecodeAttention
from engine.offload_store import OffloadStore
from engine.scheduler import RunPlan, StepPlan
from engine.streams import side_stream
from kernels.rope import rope_, rope_reference


class NullRecorder:
    """The recorder interface the runtime feeds (engine/telemetry): spans per lane, layer and stream."""

    def begin(self, lane: str, layer: int, stream=None, nbytes: int = 0):
        return None

    def end(self, handle, stream=None) -> None:
        return None


class OffloadRuntime:
    def __init__(self, adapter: DecoderAdapter, plan: RunPlan, store: OffloadStore, attend: DecodeAttention, *,
                 prompt_lens: list[int], overlapped: bool = True, recorder=None, cuda_graphs: bool = True):
        self.adapter, self.plan, self.store, self.attend = adapter, plan, store, attend
        self.spec = adapter.spec
        self.device = store.device
        self.prompt_lens = list(prompt_lens)
        self.overlapped = overlapped
        self.recorder = recorder or NullRecorder()
        cuda = self.device.type == "cuda"
        # attend_layer and mlp_layer of each layer as CUDA graphs, captured at the first step (GPU only): an eager
        # layer enqueues ~40 small kernels, and at PCIe speed the host must keep ahead of the copies.
        self.use_graphs, self.graphs = cuda_graphs and cuda, None
        self.graphs_why = "eager layers" + ("" if cuda else " (no GPU)")
        self.h2d = side_stream(self.device, "h2d") if cuda else None
        self.d2h = side_stream(self.device, "d2h") if cuda else None
        num_chunks = max((len(p.chunks) for p in plan.steps), default=0)
        new_event = (lambda: torch.cuda.Event()) if cuda else (lambda: None)
        # One pool of events for the run: reused every step (a wait binds to the record made before it).
        self.act_ready = [[new_event() for _ in range(num_chunks)] for _ in range(2)]
        self.kv_ready = [new_event() for _ in range(2)]
        self.slot_free = [new_event() for _ in range(2)]
        self.new_ready = [new_event() for _ in range(self.spec.num_layers)]
        self.stored = [new_event() for _ in range(self.spec.num_layers)]
        # RoPE for every slot, once per run: recomputed K at slot p is rotated for position p.
        positions = torch.arange(plan.max_tokens, device=self.device)[None, :]
        probe = torch.zeros(1, 1, self.spec.hidden_size, dtype=store.stage_act.dtype, device=self.device)
        rope = adapter.rope(probe, positions)
        self.rope_cos, self.rope_sin = (None, None) if rope is None else (rope[0][0].contiguous(), rope[1][0].contiguous())

    # -- prefill -------------------------------------------------------------------------------------------
    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        """Prefill's K/V (B, T, Hkv, D) and activations X (B, T, h) of one layer, to where the plan keeps them."""
        store, num_tokens = self.store, k.shape[1]
        kv = torch.stack((k, v), dim=2).transpose(0, 1)  # (T, B, 2, Hkv, D)
        g = min(store.plan.resident_tokens, num_tokens)
        if g:
            store.resident[layer, :g].copy_(kv[:g])
        kv_lo = max(store.kv_lo, 0)
        if kv_lo < num_tokens:
            self._to_host(store.host_kv_slots(layer, kv_lo, num_tokens), kv[kv_lo:num_tokens])
        act_lo, act_hi = store.plan.act_range[0], min(store.plan.act_range[1], num_tokens)
        if act_lo < act_hi:
            self._to_host(store.host_act_slots(layer, act_lo, act_hi), x.transpose(0, 1)[act_lo:act_hi])

    def _to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.d2h is None:
            dst.copy_(src)
            return
        src = src.contiguous()  # one DMA; the layer's next work overlaps it
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self.d2h)

    def finish_prefill(self) -> None:
        if self.d2h is not None:
            self.h2d.wait_stream(self.d2h)  # the first step's loads read what prefill wrote

    # -- the verbs -----------------------------------------------------------------------------------------
    def load_act(self, layer: int, slot: int, lo: int, hi: int) -> None:
        store = self.store
        dst = store.stage_act[slot, lo - store.act_lo : hi - store.act_lo]
        handle = self.recorder.begin("h2d_act", layer, self._stream(self.h2d), dst.numel() * dst.element_size())
        dst.copy_(store.host_act_slots(layer, lo, hi), non_blocking=True)
        self.recorder.end(handle, self._stream(self.h2d))

    def load_kv(self, layer: int, slot: int, lo: int, hi: int) -> None:
        dst = self.store.stage_kv[slot, lo:hi]
        handle = self.recorder.begin("h2d_kv", layer, self._stream(self.h2d), dst.numel() * dst.element_size())
        dst.copy_(self.store.host_kv_slots(layer, lo, hi), non_blocking=True)
        self.recorder.end(handle, self._stream(self.h2d))

    def fuse_kv_weights(self, layer: int) -> None:
        """[W_k; W_v] (and biases) of `layer` into the store's one recompute weight, once per layer and step."""
        k_proj, v_proj = self.adapter.kv_projections(layer)
        torch.cat((k_proj.weight, v_proj.weight), out=self.store.kv_weight)
        if k_proj.bias is not None:
            torch.cat((k_proj.bias, v_proj.bias), out=self.store.kv_bias)

    def recompute_kv(self, layer: int, slot: int, lo: int, hi: int) -> None:
        """K, V of slots [lo, hi) from their activations: one GEMM writes [K | V] rows of staging in place, then
        the family's k-norm and RoPE at each slot's position."""
        store, batch = self.store, self.plan.batch
        handle = self.recorder.begin("recompute", layer)
        x = store.stage_act[slot, lo - store.act_lo : hi - store.act_lo].flatten(0, 1)  # (c * B, h)
        out = store.stage_kv[slot, lo:hi]  # (c, B, 2, Hkv, D), contiguous: (c * B) rows of [K | V]
        out_rows = out.view(x.shape[0], -1)
        if self.adapter.kv_projections(layer)[0].bias is not None:
            torch.addmm(store.kv_bias, x, store.kv_weight.t(), out=out_rows)
        else:
            torch.mm(x, store.kv_weight.t(), out=out_rows)
        k = out[:, :, 0].flatten(0, 1)  # (c * B, Hkv, D), row stride 2 * Hkv * D
        self.adapter.finish_k_(layer, k)
        if self.rope_cos is not None:
            cos, sin = self.rope_cos[lo:hi], self.rope_sin[lo:hi]
            if self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
                rope_(k, cos, sin, rows_per_position=batch)
            else:  # plain CPU: the same rotation in torch
                k.copy_(rope_reference(k, cos, sin, rows_per_position=batch))
        self.recorder.end(handle)

    def attend_layer(self, layer: int, slot: int, hidden: torch.Tensor, rope, positions: torch.Tensor,
                     seq_lens: torch.Tensor, *, kv_len: int, resident: int,
                     resident_rows: torch.Tensor | None) -> torch.Tensor:
        """One layer for the new token (B, 1, h), over staging slot `slot` whose old slots are in place: slots
        [0, resident) come from the GPU-resident K/V, attention reads [0, kv_len) masked to each sequence.
        resident_rows (B,) bool: sequences whose new token falls inside the resident range (None: none do)."""
        adapter, store = self.adapter, self.store
        handle = self.recorder.begin("attention", layer)
        x = adapter.attn_input(layer, hidden)
        q = adapter.project_q(layer, x, rope)
        k, v = adapter.project_kv(layer, x, rope)  # (B, 1, Hkv, D)
        new_kv = store.new_kv[layer]  # (B, 2, Hkv, D), read by store_new() on the D2H stream
        new_kv[:, 0].copy_(k[:, 0])
        new_kv[:, 1].copy_(v[:, 0])
        store.new_act[layer].copy_(x[:, 0])
        rows = torch.arange(k.shape[0], device=k.device)
        if resident:
            if resident_rows is not None:
                pos = positions.clamp(max=resident - 1)
                on_gpu = store.resident[layer]  # (g, B, 2, Hkv, D)
                old = on_gpu[pos, rows]
                on_gpu.index_put_((pos, rows), torch.where(resident_rows[:, None, None, None], new_kv, old))
            store.stage_kv[slot, :resident].copy_(store.resident[layer, :resident])
        store.stage_kv[slot].index_put_((positions, rows), new_kv)
        k_view, v_view = store.stage_views(slot, kv_len)
        attn = self.attend(q[:, 0], k_view, v_view, seq_lens, scale=adapter.attention_scale,
                           window=self.spec.sliding_window)
        hidden = adapter.attn_output(layer, attn.flatten(1)[:, None], hidden)
        self.recorder.end(handle)
        return hidden

    def mlp_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        handle = self.recorder.begin("compute", layer)
        hidden = self.adapter.mlp_block(layer, hidden)
        self.recorder.end(handle)
        return hidden

    def store_new(self, layer: int, groups: list[tuple[int, int, int]]) -> None:
        """Write the new token's K/V and activations of `layer` to host memory: (position, row_lo, row_hi) runs."""
        store, plan = self.store, self.plan
        kv_bytes = store.new_kv[layer].numel() * store.new_kv.element_size()
        act_bytes = store.new_act[layer].numel() * store.new_act.element_size()
        handle = self.recorder.begin("d2h_writeback", layer, self._stream(self.d2h), kv_bytes + act_bytes)
        for pos, lo, hi in groups:
            if pos >= plan.kv_range[0]:
                store.host_kv_slots(layer, pos, pos + 1)[0, lo:hi].copy_(store.new_kv[layer, lo:hi], non_blocking=True)
            if plan.act_range[0] <= pos < plan.act_range[1]:
                store.host_act_slots(layer, pos, pos + 1)[0, lo:hi].copy_(store.new_act[layer, lo:hi],
                                                                          non_blocking=True)
        self.recorder.end(handle, self._stream(self.d2h))

    # -- one decode step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """token_ids (B,) at positions (B,) -> logits (B, vocab). The sequences have grown by the same number of
        tokens since prefill, so the host knows every position without reading the GPU."""
        step = self.plan.step(seq_len)
        grown = seq_len - self.plan.prompt_tokens - 1
        host_positions = [n + grown for n in self.prompt_lens]
        groups = [(pos, rows[0][0], rows[-1][0] + 1)
                  for pos, rows in ((p, list(r)) for p, r in groupby(enumerate(host_positions), key=lambda e: e[1]))]
        resident_rows = None
        if any(p < step.resident_tokens for p in host_positions):
            resident_rows = positions < step.resident_tokens
        ids, pos = token_ids[:, None], positions[:, None]
        hidden = self.adapter.embed(ids, pos)
        rope = self.adapter.rope(hidden, pos)
        seq_lens = (positions + 1).to(torch.int32)
        if self.use_graphs and self.graphs is None:
            self._capture_graphs()
        if self.graphs is not None:
            hidden = self.graphs.load(hidden, rope, positions, seq_lens)
        run = self._overlapped if self.overlapped else self._sync
        hidden = run(step, hidden, rope, positions, seq_lens, resident_rows, groups)
        if self.graphs is not None:
            hidden = self.graphs.hidden
        return self.adapter.logits(hidden[:, 0]).float()

    def _capture_graphs(self) -> None:
        """Capture the per-layer graphs at the first step; a family whose ops cannot be captured runs eagerly."""
        from engine.offload_graphs import LayerGraphs

        try:
            self.graphs = LayerGraphs(self)
            self.graphs_why = f"per-layer compute replayed as CUDA graphs ({2 * self.spec.num_layers} graphs)"
        except RuntimeError as exc:
            self.use_graphs, self.graphs = False, None
            self.graphs_why = f"eager layers: CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]})"
            torch.cuda.synchronize(self.device)

    def _loads(self, layer: int, step: StepPlan, stream=None) -> None:
        slot = layer % 2
        for n, (lo, hi) in enumerate(step.chunks):
            self.load_act(layer, slot, lo, hi)
            _record(self.act_ready[slot][n], stream)
        lo, hi = step.transfer_range
        if hi > lo:
            self.load_kv(layer, slot, lo, hi)
        _record(self.kv_ready[slot], stream)

    def _compute(self, layer: int, step: StepPlan, hidden, rope, positions, seq_lens, resident_rows) -> torch.Tensor:
        slot = layer % 2
        if step.chunks:
            self.fuse_kv_weights(layer)
        for n, (lo, hi) in enumerate(step.chunks):
            _wait(self.act_ready[slot][n])
            self.recompute_kv(layer, slot, lo, hi)
        _wait(self.kv_ready[slot])
        _wait(self.stored[layer])  # the previous step's write-back of new_kv[layer] has left the GPU buffer
        if self.graphs is not None:  # the same two verbs, captured: one launch each
            handle = self.recorder.begin("attention", layer)
            self.graphs.attend[layer].replay()
            self.recorder.end(handle)
        else:
            hidden = self.attend_layer(layer, slot, hidden, rope, positions, seq_lens, kv_len=step.seq_len,
                                       resident=min(step.resident_tokens, step.seq_len), resident_rows=resident_rows)
        _record(self.slot_free[slot])
        _record(self.new_ready[layer])
        if self.graphs is not None:
            handle = self.recorder.begin("compute", layer)
            self.graphs.mlp[layer].replay()
            self.recorder.end(handle)
            return hidden
        return self.mlp_layer(layer, hidden)

    def _sync(self, step, hidden, rope, positions, seq_lens, resident_rows, groups) -> torch.Tensor:
        """The plain schedule: the same verbs, one after another on the current stream (events are no-ops there)."""
        for layer in range(self.spec.num_layers):
            self._loads(layer, step)
            hidden = self._compute(layer, step, hidden, rope, positions, seq_lens, resident_rows)
            self.store_new(layer, groups)
        return hidden

    def _overlapped(self, step, hidden, rope, positions, seq_lens, resident_rows, groups) -> torch.Tensor:
        """Copies on their own streams, two layers ahead at most; compute waits only for what it reads."""
        layers = self.spec.num_layers
        for layer in range(min(2, layers)):
            self._enqueue_loads(layer, step)
        for layer in range(layers):
            hidden = self._compute(layer, step, hidden, rope, positions, seq_lens, resident_rows)
            with _on(self.d2h):
                _wait(self.new_ready[layer], self.d2h)
                self.store_new(layer, groups)
                _record(self.stored[layer], self.d2h)
            if layer + 2 < layers:
                self._enqueue_loads(layer + 2, step)
        return hidden

    def _enqueue_loads(self, layer: int, step: StepPlan) -> None:
        with _on(self.h2d):
            _wait(self.slot_free[layer % 2], self.h2d)  # the layer two back has attended over this slot
            _wait(self.stored[layer], self.h2d)  # the host rows this step reads were written back
            self._loads(layer, step, self.h2d)

    def _stream(self, stream):
        return stream if self.overlapped else None

    def release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy may still read or write the store
        self.store.release()


def _record(event, stream=None) -> None:
    if event is not None:
        event.record(stream) if stream is not None else event.record()


def _wait(event, stream=None) -> None:
    if event is not None:
        (stream or torch.cuda.current_stream()).wait_event(event)


def _on(stream):
    """Run on `stream`; without a GPU (no streams) the overlapped schedule runs its verbs in the same order."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

