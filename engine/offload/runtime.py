"""Execute a RunPlan: prefill into the offloaded store, then decode steps that stream K/V back per layer.

A decode step is built from these verbs per layer, each a few tensor operations:
    load_act(layer, chunk)      H2D: the recompute range's activations, chunk by chunk
    load_kv(layer)              H2D: the transfer range's K/V
    recompute_kv(layer, chunk)  K, V = X [W_k; W_v]^T with bias, then k-norm and RoPE at the slots' positions
    attend(layer)               the one decode layer's attention half (engine/decode/layer.py) over the layer's
                                K/V segments: the GPU-resident slots in place, the staged slots from staging
    mlp(layer)                  the layer's MLP half
    store(layer)                D2H: the new token's K/V and activations, written back for later steps
`_sync` runs them in order on one stream; `_overlapped` puts the copies on an H2D and a D2H stream, two layers
of staging in flight, with events where one verb needs another's result. Both give the same tokens
(tests/test_offload.py). The runtime decides nothing: ranges and chunks come from the plan.
"""

from __future__ import annotations

import contextlib
import os
from itertools import groupby

import torch

from engine import gpu_errors
from engine.adapters import DecoderAdapter
from engine.decode.layer import DecodeAttention, attend_block, mlp_block
from engine.offload.scheduler import RunPlan, StepPlan
from engine.offload.store import OffloadStore
from engine.streams import side_stream
from kernels.rope import rope_, rope_reference
from kernels.segments import KVSegment


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
        # attend and mlp halves of each layer as CUDA graphs, captured at the first step (GPU only): an eager
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
        # What the attend verb reads this step: set per step (eager) or once (graph capture).
        self._slot, self._resident_write = 0, False
        self._kv_weight: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # Prefill assembles each layer's host-bound K/V (and activations) of all sequences here, then sends it
        # to host memory as one DMA; made at the first prefill write, dropped by finish_prefill.
        self._prefill_kv = self._prefill_act = None
        # RoPE for every slot, once per run, per layer kind: recomputed K at slot p is rotated for position p.
        self.rope_tables = self._rope_tables() if plan.recompute_enabled else (None,) * self.spec.num_layers

    def _rope_tables(self):
        positions = torch.arange(self.plan.max_tokens, device=self.device)[None, :]
        probe = torch.zeros(1, 1, self.spec.hidden_size, dtype=self.store.stage_act.dtype, device=self.device)
        tables, made = [], {}
        for pair in self.adapter.rope(probe, positions):
            if pair is None:
                tables.append(None)
                continue
            if id(pair) not in made:
                made[id(pair)] = (pair[0][0].contiguous(), pair[1][0].contiguous())  # (S, R) each
            tables.append(made[id(pair)])
        return tuple(tables)

    # -- prefill -------------------------------------------------------------------------------------------
    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, *,
                     rows: slice = slice(None)) -> None:
        """Prefill's K/V (G, T, Hkv, D) and activations X (G, T, h) of sequences `rows` of one layer, to where
        the plan keeps them: slots [0, g) into the resident cache, the host ranges through an assembly buffer
        that goes to host memory as one DMA once the layer's last group has been written."""
        store, num_tokens, batch = self.store, k.shape[1], self.plan.batch
        rows = slice(*rows.indices(batch))
        g = min(store.resident_tokens, num_tokens)
        if g:
            store.resident.write_prefix(layer, k[:, :g], v[:, :g], rows=rows)
        kv_lo = max(store.kv_lo, 0)
        if kv_lo < num_tokens:
            def fill(dst):
                dst[:, rows, 0].copy_(k[:, kv_lo:].transpose(0, 1))
                dst[:, rows, 1].copy_(v[:, kv_lo:].transpose(0, 1))

            self._prefill_kv = self._assemble(self._prefill_kv, store.host_kv_slots(layer, kv_lo, num_tokens),
                                              fill, last=rows.stop == batch)
        act_lo, act_hi = store.plan.act_range[0], min(store.plan.act_range[1], num_tokens)
        if act_lo < act_hi:
            def fill_act(dst):
                dst[:, rows].copy_(x[:, act_lo:act_hi].transpose(0, 1))

            self._prefill_act = self._assemble(self._prefill_act, store.host_act_slots(layer, act_lo, act_hi),
                                               fill_act, last=rows.stop == batch)

    def _assemble(self, buffer, dst: torch.Tensor, fill, *, last: bool):
        """Fill part of `dst` (a host view) through a GPU buffer of its shape, sent as one copy when `last`."""
        if self.d2h is None:  # host memory is the device's: write in place
            fill(dst)
            return None
        if buffer is None or buffer.shape != dst.shape:
            buffer = torch.empty(dst.shape, dtype=dst.dtype, device=self.device)
        torch.cuda.current_stream(self.device).wait_stream(self.d2h)  # the last layer's copy has left the buffer
        fill(buffer)
        if last:
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.d2h):
                dst.copy_(buffer, non_blocking=True)
        return buffer

    def finish_prefill(self) -> None:
        if self.d2h is not None:
            self.h2d.wait_stream(self.d2h)  # the first step's loads read what prefill wrote
            torch.cuda.current_stream(self.device).wait_stream(self.d2h)  # then the assembly buffers may go
        self._prefill_kv = self._prefill_act = None

    # -- the verbs -----------------------------------------------------------------------------------------
    def load_act(self, layer: int, slot: int, lo: int, hi: int) -> None:
        dst = self.store.stage_act_slots(slot, lo, hi)
        handle = self.recorder.begin("h2d_act", layer, self._stream(self.h2d), dst.numel() * dst.element_size())
        dst.copy_(self.store.host_act_slots(layer, lo, hi), non_blocking=True)
        self.recorder.end(handle, self._stream(self.h2d))

    def load_kv(self, layer: int, slot: int, lo: int, hi: int) -> None:
        dst = self.store.stage_kv_slots(slot, lo, hi)
        handle = self.recorder.begin("h2d_kv", layer, self._stream(self.h2d), dst.numel() * dst.element_size())
        dst.copy_(self.store.host_kv_slots(layer, lo, hi), non_blocking=True)
        self.recorder.end(handle, self._stream(self.h2d))

    def recompute_kv(self, layer: int, slot: int, lo: int, hi: int) -> None:
        """K, V of slots [lo, hi) from their activations: one GEMM writes [K | V] rows of staging in place, then
        the family's k-norm and RoPE at each slot's position."""
        store, batch = self.store, self.plan.batch
        handle = self.recorder.begin("recompute", layer)
        if self._kv_weight is None:  # once per layer and step: a view of the fused weight, or a fresh [W_k; W_v]
            self._kv_weight = self.adapter.kv_weight(layer)
        weight, bias = self._kv_weight
        x = store.stage_act_slots(slot, lo, hi).flatten(0, 1)  # (c * B, h)
        out = store.stage_kv_slots(slot, lo, hi)  # (c, B, 2, Hkv, D), contiguous: (c * B) rows of [K | V]
        out_rows = out.view(x.shape[0], -1)
        if bias is not None:
            torch.addmm(bias, x, weight.t(), out=out_rows)
        else:
            torch.mm(x, weight.t(), out=out_rows)
        k = out[:, :, 0].flatten(0, 1)  # (c * B, Hkv, D), row stride 2 * Hkv * D
        self.adapter.finish_k_(layer, k)
        tables = self.rope_tables[layer]
        if tables is not None:
            cos, sin = tables[0][lo:hi], tables[1][lo:hi]
            rotary = {} if cos.shape[-1] == k.shape[-1] else {"rotary_dim": cos.shape[-1]}
            if self.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
                rope_(k, cos, sin, rows_per_position=batch, **rotary)
            else:  # plain CPU: the same rotation in torch
                k.copy_(rope_reference(k, cos, sin, rows_per_position=batch, **rotary))
        self.recorder.end(handle)

    def recompute_layer(self, layer: int, slot: int, chunks, ready=None) -> None:
        """recompute_kv over `chunks` ((lo, hi) ranges) of one layer, chunk n after ready[n] (events) has fired."""
        self._kv_weight = None  # fetched by the first chunk, once per layer and step
        for n, (lo, hi) in enumerate(chunks):
            if ready is not None:
                _wait(ready[n])
            self.recompute_kv(layer, slot, lo, hi)
        self._kv_weight = None

    # The decode layer's K/V source (engine/decode/layer.py LayerKV) for the attend verb.
    def write_new(self, layer: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> None:
        """The new token's K/V (B, 1, Hkv, D): into the resident cache where its position is below g, else into
        staging; both, with its activations, into the write-back buffers the D2H stream reads."""
        store, g = self.store, self.store.resident_tokens
        new_kv = store.new_kv[layer]  # (B, 2, Hkv, D), read by store_new() on the D2H stream
        new_kv[:, 0].copy_(k[:, 0])
        new_kv[:, 1].copy_(v[:, 0])
        store.new_act[layer].copy_(x[:, 0])
        rows = torch.arange(k.shape[0], device=k.device)
        on_gpu = positions < g
        if self._resident_write:  # some sequence's new token is resident (graphs: always checked)
            at = positions.clamp(max=g - 1)
            for cache, new in ((store.resident.k, k[:, 0]), (store.resident.v, v[:, 0])):
                old = cache[layer, rows, :, at]  # (B, Hkv, D)
                cache[layer, rows, :, at] = torch.where(on_gpu[:, None, None], new, old)
        stage = store.stage_kv[self._slot]  # (S - g, B, 2, Hkv, D)
        at = (positions - g).clamp(min=0)
        old = stage[at, rows]
        stage.index_put_((at, rows), torch.where(on_gpu[:, None, None, None], old, new_kv))

    def store_target(self, layer: int) -> None:
        return None  # the new K/V go to the resident cache or staging, and to the write-back buffers: write_new

    def segments(self, layer: int, kv_len: int) -> tuple[KVSegment, ...]:
        g = self.store.resident_tokens
        parts = []
        if g:
            parts.append(self.store.resident_segment(layer, kv_len))
        if kv_len > g:
            parts.append(self.store.staged_segment(self._slot, kv_len))
        return tuple(parts)

    def attend_layer(self, layer: int, slot: int, hidden: torch.Tensor, rope, positions: torch.Tensor,
                     seq_lens: torch.Tensor, *, kv_len: int, resident_write: bool) -> torch.Tensor:
        """The attention half of the one decode layer for the new token (B, 1, h), over staging slot `slot` and the
        resident cache, attention reading [0, kv_len) masked to each sequence."""
        handle = self.recorder.begin("attention", layer)
        self._slot, self._resident_write = slot, resident_write
        hidden = attend_block(self.adapter, layer, hidden, rope, positions, seq_lens, kv=self, kv_len=kv_len,
                              attend=self.attend)
        self.recorder.end(handle)
        return hidden

    def mlp_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        handle = self.recorder.begin("compute", layer)
        hidden = mlp_block(self.adapter, layer, hidden)
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
        resident_write = any(p < self.store.resident_tokens for p in host_positions)
        ids, pos = token_ids[:, None], positions[:, None]
        hidden = self.adapter.embed(ids, pos)
        ropes = self.adapter.rope(hidden, pos)
        seq_lens = (positions + 1).to(torch.int32)
        if self.use_graphs and self.graphs is None:
            self._capture_graphs()
        if self.graphs is not None:
            hidden = self.graphs.load(hidden, ropes, positions, seq_lens)
        run = self._overlapped if self.overlapped else self._sync
        hidden = run(step, hidden, ropes, positions, seq_lens, resident_write, groups)
        if self.graphs is not None:
            hidden = self.graphs.hidden
        return self.adapter.logits(hidden[:, 0]).float()

    def _capture_graphs(self) -> None:
        """Capture the per-layer graphs at the first step; a family whose ops cannot be captured runs eagerly. Capture
        attends over every slot (resident and staged), writing the new token where each sequence's position says."""
        from engine.decode.layer_graphs import LayerGraphs

        def attend(layer, hidden, rope, positions, seq_lens):
            return self.attend_layer(layer, layer % 2, hidden, rope, positions, seq_lens, kv_len=self.plan.max_tokens,
                                     resident_write=self.store.resident_tokens > 0)

        recorder, self.recorder = self.recorder, NullRecorder()  # events must not become graph nodes
        try:
            self.graphs = LayerGraphs(self.adapter, attend=attend, mlp=self.mlp_layer, batch=self.plan.batch,
                                      max_tokens=self.plan.max_tokens, dtype=self.store.stage_act.dtype,
                                      device=self.device)
            self.graphs_why = f"per-layer compute replayed as CUDA graphs ({2 * self.spec.num_layers} graphs)"
        except RuntimeError as exc:
            self.use_graphs, self.graphs = False, None
            self.graphs_why = f"eager layers: CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]})"
            torch.cuda.synchronize(self.device)
        finally:
            self.recorder = recorder

    def _loads(self, layer: int, step: StepPlan, stream=None) -> None:
        slot = layer % 2
        for n, (lo, hi) in enumerate(step.chunks):
            self.load_act(layer, slot, lo, hi)
            _record(self.act_ready[slot][n], stream)
        lo, hi = step.transfer_range
        if hi > lo:
            self.load_kv(layer, slot, lo, hi)
        _record(self.kv_ready[slot], stream)

    def _compute(self, layer: int, step: StepPlan, hidden, ropes, positions, seq_lens, resident_write) -> torch.Tensor:
        slot = layer % 2
        self.recompute_layer(layer, slot, step.chunks, self.act_ready[slot])
        _wait(self.kv_ready[slot])
        _wait(self.stored[layer])  # the previous step's write-back of new_kv[layer] has left the GPU buffer
        if self.graphs is not None:  # the same two verbs, captured: one launch each
            handle = self.recorder.begin("attention", layer)
            self.graphs.attend[layer].replay()
            self.recorder.end(handle)
        else:
            hidden = self.attend_layer(layer, slot, hidden, ropes[layer], positions, seq_lens, kv_len=step.seq_len,
                                       resident_write=resident_write)
        _record(self.slot_free[slot])
        _record(self.new_ready[layer])
        if self.graphs is not None:
            handle = self.recorder.begin("compute", layer)
            self.graphs.mlp[layer].replay()
            self.recorder.end(handle)
            return hidden
        return self.mlp_layer(layer, hidden)

    def _sync(self, step, hidden, ropes, positions, seq_lens, resident_write, groups) -> torch.Tensor:
        """The plain schedule: the same verbs, one after another on the current stream (events are no-ops there)."""
        for layer in range(self.spec.num_layers):
            self._loads(layer, step)
            hidden = self._compute(layer, step, hidden, ropes, positions, seq_lens, resident_write)
            self.store_new(layer, groups)
        return hidden

    def _overlapped(self, step, hidden, ropes, positions, seq_lens, resident_write, groups) -> torch.Tensor:
        """Copies on their own streams, two layers ahead at most; compute waits only for what it reads."""
        layers = self.spec.num_layers
        for layer in range(min(2, layers)):
            self._enqueue_loads(layer, step)
        for layer in range(layers):
            hidden = self._compute(layer, step, hidden, ropes, positions, seq_lens, resident_write)
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
        """Wait for every copy to finish, then unpin and free the store. After a lost GPU context the wait fails:
        the host memory is unpinned (CUDA may refuse) and freed all the same, and the GPU buffers are kept, since
        freeing one would abort the process (engine/gpu_errors.py)."""
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # no copy may still read or write the store
        except Exception as exc:
            if gpu_errors.is_context_lost(exc):
                self.store.release_host()
                gpu_errors.keep(self)
            else:
                self._free()
            raise
        self._free()

    def _free(self) -> None:
        self._prefill_kv = self._prefill_act = None
        self.graphs = None
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
