"""Tensor parallel across the devices of one host: one process per GPU (torchrun), NCCL between GPUs, gloo on CPU.

    group.py     the process group, its collectives (errors instead of hangs) and the store as a side channel
    modules.py   row-parallel linear (all-reduce, bias once) and vocabulary-parallel LM head (logits gathered)
    shard.py     the transformation: a plain model cut into this rank's heads and MLP slice; refusals up front
    driver.py    rank 0 drives, the others follow: the same run on every rank, a gate before prefill, failures named
    launch.py    start an engine on every rank: join, load this rank's part, measure its link
"""

from engine.parallel.driver import TensorParallelEngine
from engine.parallel.group import LaunchSettings, PeerLostError, TPGroup
from engine.parallel.launch import launch_engine, load_rank_model, run_tensor_parallel
from engine.parallel.shard import RankSlice, check_shardable, shard_model, shard_refusal

__all__ = ["LaunchSettings", "PeerLostError", "RankSlice", "TPGroup", "TensorParallelEngine", "check_shardable",
           "launch_engine", "load_rank_model", "run_tensor_parallel", "shard_model", "shard_refusal"]
