"""Start a tensor-parallel engine on every rank: join the group, load this rank's part of the model, measure its link.

    # every rank (torchrun --nproc-per-node 2 script.py):
    from engine.parallel import run_tensor_parallel
    result = run_tensor_parallel(lambda tp: tp.generate(["To be, or not"], settings), "synthetic:llama-3-70b")
    # rank 0 gets main's result; the other ranks follow rank 0's commands and get None

Two ways to get a rank's part: "whole" loads the model as `load_model` does (same weights, same seed) and cuts it,
so a tensor-parallel run can be compared with a single-process one; "sharded" builds a synthetic preset on the meta
device, cuts it there and materialises only this rank's part (a 70B preset on GPUs that could not hold it whole),
with the replicated tensors broadcast from rank 0 so that every rank runs the same model.
"""

from __future__ import annotations

import gc
from typing import Callable

import torch

from engine import presets
from engine.adapters import check_runnable
from engine.errors import InvalidSettingsError, KVLabError, TensorParallelError
from engine.loader import (SYNTHETIC_PREFIX, LoadedModel, _init_std, dtype_name, init_random_weights_, load_model,
                           meta_synthetic, resolve_device_dtype)
from engine.memory import check_fits
from engine.offload.profiler import HardwareProfile, measure
from engine.parallel.driver import TensorParallelEngine
from engine.parallel.group import LaunchSettings, PeerLostError, TPGroup
from engine.parallel.shard import RankSlice, shard_model
from engine.tokenizer import byte_tokenizer

MATERIALIZE = ("auto", "whole", "sharded")


class _PeerFailedToLoad(RuntimeError):
    """Another rank could not load its part (it reports why)."""


def load_rank_model(source: str, group: TPGroup, *, dtype=None, seed: int = 0, max_positions: int | None = None,
                    materialize: str = "auto") -> LoadedModel:
    """This rank's part of `source`. materialize "auto": "sharded" for the full-size synthetic presets, "whole" for
    the tiny ones and for checkpoints (which are read whole on each rank, then cut: they must fit one device)."""
    if materialize not in MATERIALIZE:
        raise InvalidSettingsError(f"materialize must be one of {', '.join(MATERIALIZE)}, got {materialize!r}.")
    synthetic = source.startswith(SYNTHETIC_PREFIX)
    if materialize == "auto":
        materialize = "sharded" if synthetic and not source[len(SYNTHETIC_PREFIX):].startswith("tiny-") else "whole"
    if materialize == "sharded":
        if not synthetic:
            raise InvalidSettingsError(f"materialize='sharded' builds synthetic presets only, not {source!r}: a "
                                       "checkpoint is read whole on each rank, then cut (materialize='whole').")
        return _sharded_synthetic(source[len(SYNTHETIC_PREFIX):], group, dtype=dtype, seed=seed,
                                  max_positions=max_positions)
    loaded = load_model(source, device=group.device, dtype=dtype, seed=seed, max_positions=max_positions)
    whole = loaded.spec
    loaded.adapter, _ = shard_model(loaded.hf_model, loaded.adapter, group)
    gc.collect()  # the whole model's weights go now, before a run needs the memory
    if group.device.type == "cuda":
        torch.cuda.empty_cache()
    loaded.notes.append(_rank_note(whole, group))
    return loaded


@torch.no_grad()
def _sharded_synthetic(name: str, group: TPGroup, *, dtype, seed: int, max_positions: int | None) -> LoadedModel:
    device, dtype = resolve_device_dtype(group.device, dtype)
    model, family, config = meta_synthetic(name, dtype=dtype, max_positions=max_positions)
    plain = family(model)  # not run on the meta device (engine/parallel/shard.py); checked once materialised
    whole = plain.spec
    failure = None
    try:
        adapter, own = shard_model(model, plain, group)
        weight_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
        check_fits(weight_bytes, device, what=f"rank {group.rank}'s part of synthetic:{name} in {dtype_name(dtype)}",
                   fix="launch more ranks, choose a smaller preset or a 16-bit dtype.")
        model.to_empty(device=device)
        # Each rank draws its own part; what every rank holds (embeddings, norms, biases of row-parallel projections)
        # is then rank 0's, so the ranks run one model.
        init_random_weights_(model, std=_init_std(config), seed=seed + group.rank)
    except (KVLabError, RuntimeError) as exc:
        failure = exc
    if not group.agree(failure is None):  # the broadcasts below need every rank
        raise failure if failure is not None else _PeerFailedToLoad()
    for param_name, param in model.named_parameters():
        if param_name not in own:
            group.broadcast_(param.data, src=0)
    model.eval()
    check_runnable(adapter)
    tok = byte_tokenizer(bos=presets.SYNTHETIC_BOS_ID, eos=presets.SYNTHETIC_EOS_ID, pad=presets.SYNTHETIC_PAD_ID)
    return LoadedModel(source=SYNTHETIC_PREFIX + name, name=name, hf_model=model, adapter=adapter, tokenizer=tok,
                       device=device, dtype=dtype, load_s=0.0,
                       notes=["random weights (synthetic preset), drawn per rank: the shapes are real, the text is not",
                              _rank_note(whole, group), *getattr(adapter, "notes", ())])


def _rank_note(whole, group: TPGroup) -> str:
    part = RankSlice(spec=whole, rank=group.rank, world_size=group.world_size)
    kv_lo, kv_hi = part.kv_heads
    shared = f" (each shared by {group.world_size // whole.num_kv_heads} ranks)" \
        if whole.num_kv_heads < group.world_size else ""
    return (f"tensor parallel: rank {group.rank} of {group.world_size} holds query heads {part.heads[0]}..."
            f"{part.heads[1] - 1}, K/V heads {kv_lo}...{kv_hi - 1}{shared}, MLP features {part.mlp[0]}..."
            f"{part.mlp[1] - 1} and vocabulary rows of the LM head; {group.backend} all-reduces")


def launch_engine(source: str, *, launch: LaunchSettings | None = None, group: TPGroup | None = None, dtype=None,
                  seed: int = 0, max_positions: int | None = None, materialize: str = "auto",
                  profile: HardwareProfile | str | None = "measure") -> TensorParallelEngine:
    """Join the group (torchrun's environment unless `launch` is given; or run over `group`, which then outlives the
    engine) and load this rank's part. Every rank calls it; a rank that cannot load makes every rank raise, naming
    it.

    profile: "measure" measures this rank's own link and GEMMs at start (all ranks at once, so shared PCIe switches
    show as they will run); a HardwareProfile is used as given; None reads the device's cached profile."""
    owns_group = group is None
    if group is None:
        group = TPGroup(launch or LaunchSettings.from_env())
    leave = group.close if owns_group else (lambda: None)
    error, failed_with = None, None
    try:
        if profile != "measure" and profile is not None and not isinstance(profile, HardwareProfile):
            raise InvalidSettingsError(f"profile must be 'measure', a HardwareProfile or None, got {profile!r}.")
        model = load_rank_model(source, group, dtype=dtype, seed=seed, max_positions=max_positions,
                                materialize=materialize)
    except PeerLostError:
        group.close()  # a broken group is no use to anyone
        raise
    except _PeerFailedToLoad as exc:
        error, failed_with = "", exc  # failed, but the reason is another rank's
    except (KVLabError, RuntimeError, ValueError) as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}"
        failed_with = exc
    try:
        errors = group.gather_objects(error)
    except PeerLostError as exc:
        group.close()
        raise TensorParallelError(f"Tensor-parallel start over {group.world_size} ranks failed: {exc}.") from None
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if any(e is not None for e in errors):
        leave()
        if errors[group.rank]:  # this rank's own reason (a shape that does not split fails every rank alike)
            raise failed_with
        rank, message = failed[0]
        raise TensorParallelError(f"Tensor-parallel start failed: rank {rank} could not load {source}: {message}")
    if profile == "measure":  # every rank loaded: measure the links together
        group.barrier()
        profile = measure(group.device, quick=group.device.type != "cuda")
    return TensorParallelEngine(group, model, profile=profile, owns_group=owns_group)


def run_tensor_parallel(main: Callable[[TensorParallelEngine], object], source: str, **launch_kwargs):
    """Every rank calls this: rank 0 runs main(engine) and returns its result, the others follow rank 0 and return
    None. The engine is closed on every rank when main returns or raises."""
    engine = launch_engine(source, **launch_kwargs)
    if engine.rank != 0:
        engine.follow()
        return None
    try:
        return main(engine)
    finally:
        engine.close()


__all__ = ["MATERIALIZE", "launch_engine", "load_rank_model", "run_tensor_parallel"]
