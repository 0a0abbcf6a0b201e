"""Tensor parallelism as a transformation of the plain model: each rank keeps its heads and its slice of the MLP.

`shard_model(loaded, group)` rewrites the transformers model in place into this rank's part and rebuilds the
family's adapter over it, so the whole engine (GPU-resident, offloaded, hybrid, KV recomputation) runs per rank
unchanged and the adapters never hear of ranks:

    q, k, v / fused qkv, gate, up / fused gate_up, fc1   column-parallel: this rank's output rows
    o_proj / out_proj, down_proj / fc2                   row-parallel: this rank's input columns, all-reduced
                                                         (engine/parallel/modules.py), bias added once
    embeddings, norms, rotary tables                     replicated
    LM head                                              vocabulary-parallel, logits all-gathered

K/V heads split over the ranks; with fewer K/V heads than ranks (GQA), each K/V head is replicated onto the
world / kv_heads ranks whose query heads read it. The rank's spec says num_heads / world query heads and its own
K/V heads, with the full hidden size: the offload scheduler then sees this rank's K/V bytes per token and the
full-size activations that recomputation ships (ModelSpec.kv_bytes_per_token, act_bytes_per_token).

Which modules are which is the one thing this file knows per family (LAYOUTS): the names transformers gives them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.adapters import DecoderAdapter, ModelSpec, check_runnable, check_supported
from engine.errors import UnsupportedArchitectureError
from engine.parallel.group import TPGroup
from engine.parallel.modules import RowParallelLinear, VocabParallelHead

# Row kinds of a column-parallel weight (or column kinds of a row-parallel one): query heads, K/V heads, MLP rows;
# "qkv" and "gate_up" are fused weights of stacked parts.
_Q, _KV, _MLP, _QKV, _GATE_UP = "q", "kv", "mlp", "qkv", "gate_up"


@dataclass(frozen=True)
class ShardLayout:
    """Per family: which Linear modules of a decoder layer split by rows (column-parallel) and which by columns
    (row-parallel), as (path in the layer, kind)."""

    column: tuple[tuple[str, str], ...]
    row: tuple[tuple[str, str], ...]


_SEPARATE = ShardLayout(
    column=(("self_attn.q_proj", _Q), ("self_attn.k_proj", _KV), ("self_attn.v_proj", _KV),
            ("mlp.gate_proj", _MLP), ("mlp.up_proj", _MLP)),
    row=(("self_attn.o_proj", _Q), ("mlp.down_proj", _MLP)))
LAYOUTS: dict[str, ShardLayout] = {
    "llama": _SEPARATE,
    "gemma": _SEPARATE,
    "phi3": ShardLayout(column=(("self_attn.qkv_proj", _QKV), ("mlp.gate_up_proj", _GATE_UP)),
                        row=(("self_attn.o_proj", _Q), ("mlp.down_proj", _MLP))),
    "opt": ShardLayout(column=(("self_attn.q_proj", _Q), ("self_attn.k_proj", _KV), ("self_attn.v_proj", _KV),
                               ("fc1", _MLP)),
                       row=(("self_attn.out_proj", _Q), ("fc2", _MLP))),
}


@dataclass(frozen=True)
class RankSlice:
    """What rank `rank` of `world_size` keeps of a model of shape `spec` (index ranges, end exclusive)."""

    spec: ModelSpec  # the whole model's
    rank: int
    world_size: int

    @property
    def heads(self) -> tuple[int, int]:
        n = self.spec.num_heads // self.world_size
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_heads(self) -> tuple[int, int]:
        kv, world = self.spec.num_kv_heads, self.world_size
        if kv >= world:
            n = kv // world
            return self.rank * n, (self.rank + 1) * n
        first = self.rank * kv // world  # replicated: world / kv ranks share each K/V head
        return first, first + 1

    @property
    def mlp(self) -> tuple[int, int]:
        n = self.spec.intermediate_size // self.world_size
        return self.rank * n, (self.rank + 1) * n

    def rows(self, kind: str) -> torch.Tensor:
        """Indices of this rank's rows of a weight of `kind`."""
        d, s = self.spec.head_dim, self.spec
        span = lambda lo, hi, offset=0: torch.arange(lo + offset, hi + offset)  # noqa: E731
        q = span(self.heads[0] * d, self.heads[1] * d)
        kv = span(self.kv_heads[0] * d, self.kv_heads[1] * d)
        mlp = span(*self.mlp)
        if kind == _Q:
            return q
        if kind == _KV:
            return kv
        if kind == _MLP:
            return mlp
        if kind == _QKV:  # [q | k | v] rows
            q_rows, kv_rows = s.num_heads * d, s.num_kv_heads * d
            return torch.cat((q, kv + q_rows, kv + q_rows + kv_rows))
        if kind == _GATE_UP:  # [gate | up] rows
            return torch.cat((mlp, mlp + s.intermediate_size))
        raise ValueError(f"unknown weight kind {kind!r}")

    def local_spec_fields(self) -> dict:
        return dict(num_heads=self.heads[1] - self.heads[0], num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
                    intermediate_size=self.mlp[1] - self.mlp[0], head_dim=self.spec.head_dim)


def shard_refusal(spec: ModelSpec, world_size: int) -> str | None:
    """Why `spec` cannot run over `world_size` ranks (None: it can), naming the counts and the fix."""
    if spec.family not in LAYOUTS:
        return f"tensor parallelism has no layout for the {spec.family} family (supported: {', '.join(LAYOUTS)})"
    divisors = lambda n: ", ".join(str(w) for w in range(1, n + 1) if n % w == 0)  # noqa: E731
    if spec.num_heads % world_size:
        return (f"{spec.model_type}: {spec.num_heads} query heads do not split over {world_size} ranks: launch a "
                f"world size that divides {spec.num_heads} ({divisors(spec.num_heads)})")
    kv = spec.num_kv_heads
    if kv >= world_size and kv % world_size:
        return (f"{spec.model_type}: {kv} K/V heads do not split over {world_size} ranks: launch a world size that "
                f"divides {kv} ({divisors(kv)}), or a multiple of {kv} that divides {spec.num_heads}")
    if kv < world_size and world_size % kv:
        return (f"{spec.model_type}: {kv} K/V heads cannot be replicated evenly onto {world_size} ranks (each K/V "
                f"head goes to world / {kv} ranks): launch a world size that divides {kv} or is a multiple of it")
    if spec.intermediate_size % world_size:
        return (f"{spec.model_type}: the MLP's {spec.intermediate_size} intermediate features do not split over "
                f"{world_size} ranks: launch a world size that divides {spec.intermediate_size}")
    return None


def check_shardable(spec: ModelSpec, world_size: int) -> None:
    why = shard_refusal(spec, world_size)
    if why is not None:
        raise UnsupportedArchitectureError(f"Tensor parallel over {world_size} ranks refused: {why}.")


@torch.no_grad()
def shard_model(hf_model: torch.nn.Module, adapter: DecoderAdapter, group: TPGroup) -> tuple[DecoderAdapter, set[str]]:
    """Rewrite `hf_model` (with its plain `adapter`) in place into this rank's part -> (the rank's adapter, the names
    of the parameters that are this rank's own, i.e. not replicated). Works on meta tensors too (a model sharded
    before its weights exist)."""
    spec = adapter.spec
    check_shardable(spec, group.world_size)
    part = RankSlice(spec=spec, rank=group.rank, world_size=group.world_size)
    layout = LAYOUTS[spec.family]
    own: set[int] = set()
    for layer in adapter.layers:
        for path, kind in layout.column:
            linear = layer.get_submodule(path)
            rows = part.rows(kind).to(linear.weight.device)
            linear.weight = torch.nn.Parameter(linear.weight.index_select(0, rows), requires_grad=False)
            if linear.bias is not None:
                linear.bias = torch.nn.Parameter(linear.bias.index_select(0, rows), requires_grad=False)
            linear.out_features = rows.numel()
            own.update((id(linear.weight), id(linear.bias)))
        for path, kind in layout.row:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            linear = getattr(parent, name)
            cols = part.rows(kind).to(linear.weight.device)
            row = RowParallelLinear(cols.numel(), linear.out_features, bias=linear.bias is not None, group=group,
                                    device="meta", dtype=linear.weight.dtype)
            row.weight = torch.nn.Parameter(linear.weight.index_select(1, cols), requires_grad=False)
            if linear.bias is not None:
                row.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)  # replicated
            setattr(parent, name, row)
            own.add(id(row.weight))
    hf_model.lm_head = _vocab_parallel_head(hf_model, spec, group, own)
    _describe_rank_in_config(hf_model.config.get_text_config(), part)
    # Built, then checked only where its weights exist: running a model on the meta device leaves meta tensors in the
    # modules' caches (LongRoPE's long frequencies), which the materialised model would then read.
    local = check_supported(hf_model.config.model_type)(hf_model)
    # A family that derives a shape from others (OPT: head_dim = hidden / heads) is told the rank's shape outright.
    local.spec = replace(local.spec, **part.local_spec_fields())
    if not next(hf_model.parameters()).is_meta:
        check_runnable(local)
    return local, {name for name, p in hf_model.named_parameters() if id(p) in own}


def _vocab_parallel_head(hf_model, spec: ModelSpec, group: TPGroup, own: set[int]) -> VocabParallelHead:
    head, embedding = hf_model.lm_head, hf_model.get_input_embeddings()
    if isinstance(head, VocabParallelHead):
        raise UnsupportedArchitectureError("this model is already sharded: shard a plain model once.")
    if head.weight is embedding.weight:
        return VocabParallelHead(None, vocab_size=spec.vocab_size, group=group, tied=embedding)
    chunk = -(-spec.vocab_size // group.world_size)
    start = min(spec.vocab_size, group.rank * chunk)
    stop = min(spec.vocab_size, start + chunk)
    rows = torch.nn.Linear(head.in_features, stop - start, bias=head.bias is not None, device="meta",
                           dtype=head.weight.dtype)
    rows.weight = torch.nn.Parameter(head.weight[start:stop].clone(), requires_grad=False)
    if head.bias is not None:
        rows.bias = torch.nn.Parameter(head.bias[start:stop].clone(), requires_grad=False)
    own.update((id(rows.weight), id(rows.bias)))
    return VocabParallelHead(rows, vocab_size=spec.vocab_size, group=group)


def _describe_rank_in_config(config, part: RankSlice) -> None:
    """The config now describes this rank's model: its heads, its MLP width, the head size stated outright (families
    that derive it from hidden / heads would otherwise get it wrong)."""
    local = part.local_spec_fields()
    config.num_attention_heads = local["num_heads"]
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = local["num_kv_heads"]
    for name in ("intermediate_size", "ffn_dim"):
        if hasattr(config, name):
            setattr(config, name, local["intermediate_size"])
    config.head_dim = local["head_dim"]
