"""A decode step's per-layer compute as CUDA graphs: two launches per layer instead of ~40 kernels.

Used where a step cannot be one graph: an offloaded step, whose copies and recomputation change every step and
run eagerly between the layers' graphs; and a profiled GPU-resident step, whose lanes are timed per layer with
events between the graphs. Each layer's attention half and MLP half (engine/decode/layer.py) are captured once
per run with static inputs (hidden state, positions, lengths, RoPE of the new token per kind of layer) and
attention over every slot of the layer's segments, masked to each sequence's length. The graphs replay on the
compute stream; events recorded between them are not part of any graph.
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.streams import side_stream

# attend(layer, hidden, rope, positions, seq_lens) and mlp(layer, hidden) -> hidden: the halves to capture, over all
# slots of the run.
AttendHalf = Callable[[int, torch.Tensor, object, torch.Tensor, torch.Tensor], torch.Tensor]
MlpHalf = Callable[[int, torch.Tensor], torch.Tensor]


class LayerGraphs:
    def __init__(self, adapter, *, attend: AttendHalf, mlp: MlpHalf, batch: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        spec = adapter.spec
        self.hidden = torch.zeros(batch, 1, spec.hidden_size, dtype=dtype, device=device)
        self.mid = torch.zeros_like(self.hidden)
        # Warm-up and capture write the new token's K/V at the last slot, which no step reads before writing it.
        self.positions = torch.full((batch,), max_tokens - 1, dtype=torch.long, device=device)
        self.seq_lens = torch.full((batch,), max_tokens, dtype=torch.int32, device=device)
        # Static RoPE buffers, one per kind of layer (layers sharing a (cos, sin) pair share a buffer).
        probe = adapter.rope(self.hidden, self.positions[:, None])
        self._rope_source = _first_of_each(probe)  # layer -> the first layer with the same pair
        static = {first: None if probe[first] is None else tuple(torch.zeros_like(t) for t in probe[first])
                  for first in set(self._rope_source)}
        self.ropes = tuple(static[first] for first in self._rope_source)

        def attend_body(layer: int) -> None:
            self.mid.copy_(attend(layer, self.hidden, self.ropes[layer], self.positions, self.seq_lens))

        def mlp_body(layer: int) -> None:
            self.hidden.copy_(mlp(layer, self.mid))

        side = side_stream(device, "warm-up")
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # cuBLAS handles, Triton compiles: outside the capture
            for layer in range(spec.num_layers):
                attend_body(layer)
                mlp_body(layer)
        torch.cuda.current_stream(device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.attend, self.mlp = [], []
        for layer in range(spec.num_layers):
            for body, graphs in ((attend_body, self.attend), (mlp_body, self.mlp)):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    body(layer)
                graphs.append(graph)

    def load(self, hidden: torch.Tensor, ropes, positions: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Copy one step's inputs into the graphs' static buffers; returns the static hidden state."""
        self.hidden.copy_(hidden)
        self.positions.copy_(positions)
        self.seq_lens.copy_(seq_lens)
        for layer, first in enumerate(self._rope_source):
            if first == layer and ropes[layer] is not None:
                for static, fresh in zip(self.ropes[layer], ropes[layer]):
                    static.copy_(fresh)
        return self.hidden


def _first_of_each(pairs) -> tuple[int, ...]:
    """For each layer, the first layer whose RoPE pair is the same object (the adapter shares pairs by kind)."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(id(pair), layer) for layer, pair in enumerate(pairs))
