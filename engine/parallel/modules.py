"""The two modules tensor parallelism adds to a model: a row-parallel linear and a vocabulary-parallel LM head.

Column-parallel projections (q, k, v, gate, up) need nothing new: a rank keeps its rows of the weight and its input
is the full hidden state every rank holds. A row-parallel projection (o, down) keeps its columns: each rank's
product is a partial sum, all-reduced before the bias (added once, after the sum) and before whatever the family
does next (a residual add, Gemma's post-norms), which then sees the whole output as in one process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.parallel.group import TPGroup


class RowParallelLinear(torch.nn.Linear):
    """x (..., in_features / world) -> (..., out_features) summed over the ranks, then + bias.

    A Linear, so that whatever walks a model's Linear modules (the synthetic loader's initialiser) treats it as one."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, group: TPGroup, device, dtype):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        self.group.all_reduce_(out)
        return out if self.bias is None else out + self.bias


class VocabParallelHead(torch.nn.Module):
    """The LM head over this rank's rows of the vocabulary, its logits gathered so every rank holds all of them.

    Every rank then samples from the very same logits (the all-gather copies, it does not add), so seeded sampling
    agrees across ranks by construction. Rank r owns rows [r * chunk, (r + 1) * chunk) of a vocabulary padded to
    world * chunk; the padding's logits are cut off after the gather. A head tied to the input embedding narrows the
    embedding's weight (a view) instead of holding a copy."""

    def __init__(self, rows: torch.nn.Linear | None, *, vocab_size: int, group: TPGroup,
                 tied: torch.nn.Module | None = None):
        super().__init__()
        if (rows is None) == (tied is None):
            raise ValueError("a vocabulary-parallel head holds its rows or is tied to an embedding, not both")
        self.group, self.vocab_size = group, vocab_size
        self.chunk = -(-vocab_size // group.world_size)
        self.start = min(vocab_size, group.rank * self.chunk)
        self.stop = min(vocab_size, self.start + self.chunk)
        self.rows = rows  # a Linear (hidden -> stop - start), or None when tied
        self.tied = [tied]  # in a list: the embedding is the decoder's module, not a child of the head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        embedding = self.tied[0]
        logits = self.rows(hidden) if embedding is None else F.linear(hidden, embedding.weight[self.start : self.stop])
        short = self.chunk - logits.shape[-1]  # (..., stop - start) -> (..., chunk)
        if short:
            logits = F.pad(logits, (0, short))
        return self.group.all_gather_last(logits)[..., : self.vocab_size]
