"""The offloaded step's per-layer compute as CUDA graphs: two launches per layer instead of ~40 kernels.

An offloaded step is PCIe-bound only if the host enqueues work faster than the link moves it; eager, each
layer's projections, norms, RoPE, attention and MLP cost the host more than half of the step's time. The
verbs `attend_layer` and `mlp_layer` of every layer are captured once per run with static inputs (hidden
state, positions, lengths, RoPE of the new token) and attention over all slots, masked to each sequence's
length (the eager step reads only up to the longest); the recompute and copy verbs stay eager (their ranges
change every step). The graphs replay on the compute stream between the runtime's event waits.
"""

from __future__ import annotations

import torch

from engine.offload_runtime import NullRecorder
from engine.streams import side_stream


class LayerGraphs:
    def __init__(self, runtime) -> None:
        spec, plan, device = runtime.spec, runtime.plan, runtime.device
        batch, slots = plan.batch, plan.max_tokens
        dtype = runtime.store.stage_act.dtype
        self.hidden = torch.zeros(batch, 1, spec.hidden_size, dtype=dtype, device=device)
        self.mid = torch.zeros_like(self.hidden)
        # Warm-up and capture write the new token's K/V at the last slot, which no step reads before writing it.
        self.positions = torch.full((batch,), slots - 1, dtype=torch.long, device=device)
        self.seq_lens = torch.full((batch,), slots, dtype=torch.int32, device=device)
        rotary = runtime.rope_cos is not None
        self.cos = torch.zeros(batch, 1, spec.head_dim, dtype=dtype, device=device) if rotary else None
        self.sin = torch.zeros_like(self.cos) if rotary else None
        resident = min(plan.resident_tokens, slots)
        recorder, runtime.recorder = runtime.recorder, NullRecorder()  # events must not become graph nodes

        def attend(layer: int) -> None:
            rows = (self.positions < resident) if resident else None
            rope = (self.cos, self.sin) if rotary else None
            out = runtime.attend_layer(layer, layer % 2, self.hidden, rope, self.positions, self.seq_lens,
                                       kv_len=slots, resident=resident, resident_rows=rows)
            self.mid.copy_(out)

        def mlp(layer: int) -> None:
            self.hidden.copy_(runtime.mlp_layer(layer, self.mid))

        try:
            side = side_stream(device, "warm-up")
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # cuBLAS handles, Triton compiles: outside the capture
                for layer in range(spec.num_layers):
                    attend(layer)
                    mlp(layer)
            torch.cuda.current_stream(device).wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            self.attend, self.mlp = [], []
            for layer in range(spec.num_layers):
                for body, graphs in ((attend, self.attend), (mlp, self.mlp)):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        body(layer)
                    graphs.append(graph)
        finally:
            runtime.recorder = recorder

    def load(self, hidden: torch.Tensor, rope, positions: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Copy one step's inputs into the graphs' static buffers; returns the static hidden state."""
        self.hidden.copy_(hidden)
        self.positions.copy_(positions)
        self.seq_lens.copy_(seq_lens)
        if self.cos is not None:
            self.cos.copy_(rope[0])
            self.sin.copy_(rope[1])
        return self.hidden

