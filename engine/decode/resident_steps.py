"""GPU-resident decode steps whose lanes are timed per layer: what a profiling run of placement "gpu" executes.

An unprofiled GPU-resident step is one CUDA graph (engine/decode/forward.py GraphedDecode): nothing inside it can
be timed. A profiled one replays each layer's attention half and MLP half as their own graphs (the graphs an
offloaded step uses, engine/decode/layer_graphs.py) with the recorder's events between them: 2 launches a layer
instead of 1 a step, a few microseconds each, so the lanes show where a step's time goes at nearly its speed.
Without a GPU the same verbs run eagerly and the recorder reads the host clock.
"""

from __future__ import annotations

import torch

from engine.adapters import DecoderAdapter
from engine.decode.kv_cache import KVCache
from engine.decode.layer import DecodeAttention, attend_block, mlp_block


class ResidentSteps:
    def __init__(self, adapter: DecoderAdapter, cache: KVCache, attend: DecodeAttention, recorder, *,
                 cuda_graphs: bool = True) -> None:
        self.adapter, self.cache, self.attend, self.recorder = adapter, cache, attend, recorder
        self.device = cache.k.device
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = None
        self.why = ("profiled GPU-resident step: each layer's attention and MLP replayed as their own CUDA graphs, "
                    "timed between them" if self.use_graphs else "profiled GPU-resident step: eager layers")

    def attend_layer(self, layer: int, hidden, rope, positions, seq_lens, *, kv_len: int) -> torch.Tensor:
        return attend_block(self.adapter, layer, hidden, rope, positions, seq_lens, kv=self.cache, kv_len=kv_len,
                            attend=self.attend)

    def mlp_layer(self, layer: int, hidden) -> torch.Tensor:
        return mlp_block(self.adapter, layer, hidden)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """token_ids (B,) at positions (B,) -> logits (B, vocab), spans "attention" and "compute" per layer."""
        adapter = self.adapter
        ids, pos = token_ids[:, None], positions[:, None]
        hidden = adapter.embed(ids, pos)
        ropes = adapter.rope(hidden, pos)
        seq_lens = (positions + 1).to(torch.int32)
        if self.use_graphs and self.graphs is None:
            self._capture()
        if self.graphs is not None:
            hidden = self.graphs.load(hidden, ropes, positions, seq_lens)
        for layer in range(adapter.spec.num_layers):
            handle = self.recorder.begin("attention", layer)
            if self.graphs is not None:
                self.graphs.attend[layer].replay()
            else:
                hidden = self.attend_layer(layer, hidden, ropes[layer], positions, seq_lens, kv_len=kv_len)
            self.recorder.end(handle)
            handle = self.recorder.begin("compute", layer)
            if self.graphs is not None:
                self.graphs.mlp[layer].replay()
            else:
                hidden = self.mlp_layer(layer, hidden)
            self.recorder.end(handle)
        if self.graphs is not None:
            hidden = self.graphs.hidden
        return adapter.logits(hidden[:, 0]).float()

    def _capture(self) -> None:
        from engine.decode.layer_graphs import LayerGraphs

        cache = self.cache
        try:
            self.graphs = LayerGraphs(
                self.adapter, batch=cache.k.shape[1], max_tokens=cache.max_tokens, dtype=cache.k.dtype,
                device=self.device, mlp=self.mlp_layer,
                attend=lambda layer, h, rope, pos, lens: self.attend_layer(layer, h, rope, pos, lens,
                                                                           kv_len=cache.max_tokens))
        except RuntimeError as exc:
            self.use_graphs, self.graphs = False, None
            self.why = f"profiled GPU-resident step: eager layers (CUDA graph capture failed: {str(exc)[:200]})"
            torch.cuda.synchronize(self.device)
