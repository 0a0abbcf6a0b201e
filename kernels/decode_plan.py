"""How one segment's decode-attention launch is chosen: splits, tile, pipeline depth, prefetch. Importable without
triton; plans hold no tensors.

`choose_launch` plans one segment from its shape (kernels/decode_attention.py's `plan_segments` calls it per
segment, with the device's tuning table); `variant_grid` lists the prefetch study's variants of one shape;
`prefetch_refusal` says why a segment's layout cannot take a bulk L2 prefetch. Plans are unit-tested on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from kernels.config import MAX_HEAD_DIM, MAX_SPLITS, DecodeAttentionConfig
from kernels.tuning import TunedVariant

# Measured on an H100 (bench/results/decode_attention*.md) unless said otherwise.
# auto: prefetch only on grids with fewer programs per SM than this. With the 3-stage cp.async pipeline,
# prefetch tied or lost (0-5 % at d=1, up to 7 % at d=2) on every bench shape, 0.97 to 7.8 programs/SM
# (decode_attention.md, 2026-11-25); the streaming read of DESIGN.md gained 48 % only at 1 CTA/SM without
# a pipeline. What is left for it: grids that leave most SMs idle (short, small batches), where one
# program's pipeline is all that is in flight. That regime is not in the bench.
AUTO_PREFETCH_MAX_PROGRAMS_PER_SM = 0.5
# About one program per SM was fastest with the 3-stage pipeline (B1 Hkv8 S32768: 0.053 ms at 0.97/SM,
# 0.057 ms at 3.9/SM); keep >= MIN_TILES_PER_SPLIT tiles in a split so the pipeline fills.
TARGET_PROGRAMS_PER_SM = 1.0
MIN_TILES_PER_SPLIT = 4
# 16 KiB tiles at 16-bit (BLOCK_N x BLOCK_D = 8K elements: 64 keys of 128 dims, 128 of 64) were the measured
# default; 32 KiB tiles keep twice the bytes in flight: 6 % faster on grids of 7.8 waves (B64/B128 GQA, D=128);
# the 3-wave floor is a guess that keeps the last wave's tail small.
TILE_ELEMENTS = 8192
BIG_TILE_MIN_WAVES = 3.0
# Under-occupied grids (fewer (seq, KV head) rows than SMs, splits filling the SMs) took 32 KiB tiles too: on an
# H200, 128-key tiles 3 stages deep were the fastest or within 0.5 us of it on B1 Hq32 Hkv8 S32768 (40.2 against
# 41.8 us with 64-key tiles), B1 Hq32 Hkv32 S8192 and B4 Hq40 Hkv8 S8192 (bench/results/decode_attention_sweep.md,
# 2026-12-01). Measured with 16 such tiles per split; kept to splits of at least this many.
BIG_TILE_MIN_TILES_PER_SPLIT = 8
# Hopper's shared memory per block (opt-in): 227 KiB. Triton's pipeline holds num_stages - 1 K and V tiles in
# flight (fp32: at least two tiles, for the fp32 dot's operand layouts) plus up to 16 KiB of layout-conversion
# scratch and the q tile: what tests/test_decode_attention_ptx.py compiles for sm_90 stays under this estimate.
HOPPER_SHARED_MEMORY_BYTES = 227 * 1024
_SCRATCH_BYTES = 16 * 1024


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class LaunchPlan:
    """How one segment's split kernel is launched; no tensors. `why` says how prefetch, tiles and splits were
    decided."""

    num_splits: int
    tiles_per_split: int
    block_n: int
    num_warps: int
    num_stages: int
    prefetch: bool
    prefetch_distance: int
    num_programs: int  # grid size of the split kernel
    programs_per_sm: float
    why: str
    segment: int = 0  # index of the segment this plan launches over
    shared_memory_bytes: int = 0  # estimated shared memory of one program


def _wanted_splits(rows: int, num_tiles: int, num_sms: int) -> int:
    """Splits per row that put about TARGET_PROGRAMS_PER_SM programs on each SM, keeping MIN_TILES_PER_SPLIT tiles in
    each split."""
    return min(max(1, int(TARGET_PROGRAMS_PER_SM * num_sms // rows)), max(1, num_tiles // MIN_TILES_PER_SPLIT))


def block_d_for(head_dim: int) -> int:
    """The padded head dim of the kernel's tiles: a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, _next_power_of_2(head_dim))


def shared_memory_estimate(block_n: int, head_dim: int, num_stages: int, *, element_bytes: int) -> int:
    """Bytes of shared memory one program of the split kernel needs at this tile and pipeline depth (an upper
    bound of what Triton 3.9 allocates for sm_90, checked by tests/test_decode_attention_ptx.py)."""
    block_d = block_d_for(head_dim)
    tile_bytes = block_n * block_d * element_bytes
    in_flight = max(2 * (num_stages - 1), 2 if element_bytes == 4 else 1) * tile_bytes
    return in_flight + _SCRATCH_BYTES + 16 * block_d * 4


def choose_launch(batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int, num_sms: int,
                  config: DecodeAttentionConfig = DecodeAttentionConfig(), *, element_bytes: int = 2,
                  interpret: bool = False, prefetch_refused: str | None = None,
                  shared_memory_bytes: int = HOPPER_SHARED_MEMORY_BYTES, tuned: TunedVariant | None = None) -> LaunchPlan:
    """Plan splits, tile size, pipeline depth and prefetch for (batch, KV heads, S, D) keys on `num_sms` SMs.

    `max_seq_len` is the most keys one sequence can see in the segment (its slots, or the window if shorter).
    `element_bytes` is the cache's element size (2 for bf16/fp16, 4 for fp32); `interpret` forces prefetch off
    (the interpreter cannot run inline PTX), and so does `prefetch_refused`, the reason the segment's layout
    cannot take a bulk prefetch. `tuned` (kernels/tuning.py: the measured fastest variant of this shape's class)
    decides what the config leaves open: prefetch under "auto" and an unset num_stages; without it, the rules.
    """
    for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads), ("max_seq_len", max_seq_len), ("num_sms", num_sms)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if element_bytes not in (2, 4):
        raise ValueError(f"element_bytes must be 2 or 4, got {element_bytes!r}")
    if not isinstance(head_dim, int) or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be an int in 1..{MAX_HEAD_DIM}, got {head_dim!r}")
    if not isinstance(config, DecodeAttentionConfig):
        raise ValueError(f"config must be a DecodeAttentionConfig, got {type(config).__name__}")
    rows = batch * num_kv_heads
    block_d = block_d_for(head_dim)
    if config.block_n is not None:
        block_n = config.block_n
    else:
        block_n = min(128, max(16, TILE_ELEMENTS // block_d))
        if element_bytes == 2 and block_d >= 128:
            big = min(128, 2 * block_n)
            if rows >= BIG_TILE_MIN_WAVES * num_sms:
                block_n = big
            elif rows < num_sms and config.num_splits is None and block_d == 128:  # the head dim measured
                big_tiles = _cdiv(max_seq_len, big)
                if big_tiles >= BIG_TILE_MIN_TILES_PER_SPLIT * min(_wanted_splits(rows, big_tiles, num_sms), MAX_SPLITS):
                    block_n = big

    def fits(tile: int, stages: int) -> bool:
        return shared_memory_estimate(tile, head_dim, stages, element_bytes=element_bytes) <= shared_memory_bytes

    if config.num_stages is not None:
        num_stages, stages_why = config.num_stages, "asked"
    elif tuned is not None:
        num_stages, stages_why = tuned.num_stages, "tuned"
    else:
        num_stages, stages_why = None, "rule"
    tile_why, wanted_tile = "", block_n
    while block_n > 16 and not fits(block_n, num_stages or 1):  # an asked tile or depth this large: say so
        block_n //= 2
        tile_why = (f" ({wanted_tile}-key tiles {_stages(num_stages or 1)} deep overflow {shared_memory_bytes >> 10} KiB "
                    f"of shared memory at head dim {head_dim})")
    if num_stages is None:
        tile_bytes = block_n * block_d * element_bytes
        # Full grids of 32 KiB tiles keep enough bytes in flight two stages deep: on an H200, 2 stages ran B128 Hq32
        # Hkv8 S2048 in 243.5 us against 246.1 with 3, and tied on B64 and B32 (2026-12-01, decode_attention_sweep2
        # and decode_attention_study); under-occupied grids of them need the third (40.2 against 41+ us at B1).
        full_grid = rows >= BIG_TILE_MIN_WAVES * num_sms and block_d == 128  # the head dim measured
        num_stages = 2 if tile_bytes > 32 * 1024 or (tile_bytes == 32 * 1024 and full_grid) else 3
    while num_stages > 1 and not fits(block_n, num_stages):
        num_stages -= 1  # K and V tiles in flight must fit in shared memory
        stages_why += ", reduced to fit shared memory"
    smem = shared_memory_estimate(block_n, head_dim, num_stages, element_bytes=element_bytes)
    num_tiles = _cdiv(max_seq_len, block_n)
    if config.num_splits is not None:
        wanted, split_why = config.num_splits, f"{config.num_splits} splits asked"
    else:
        wanted = _wanted_splits(rows, num_tiles, num_sms)
        split_why = f"{rows} (seq, KV head) rows on {num_sms} SMs, aim {TARGET_PROGRAMS_PER_SM:g} program/SM"
    tiles_per_split = _cdiv(num_tiles, max(1, min(wanted, num_tiles, MAX_SPLITS)))
    num_splits = _cdiv(num_tiles, tiles_per_split)  # no split is empty at max_seq_len keys
    num_programs = rows * num_splits
    per_sm = num_programs / num_sms
    distance = config.prefetch_distance
    if interpret:
        prefetch, why = False, "prefetch off: TRITON_INTERPRET cannot run inline PTX"
    elif prefetch_refused is not None:
        prefetch, why = False, f"prefetch off: {prefetch_refused}"
    elif config.prefetch == "off":
        prefetch, why = False, "prefetch off (asked)"
    elif config.prefetch == "on":
        prefetch, why = True, f"prefetch on (asked), {per_sm:.2f} programs/SM"
    elif tuned is not None:
        prefetch, distance = tuned.prefetch, tuned.prefetch_distance
        measured = "x".join(map(str, tuned.measured_shape)) or "its class"
        why = (f"auto, tuned: prefetch {'on' if prefetch else 'off'} and {tuned.num_stages} stages were fastest "
               f"on {measured} ({tuned.gb_s:.0f} GB/s)")
    else:
        prefetch = per_sm < AUTO_PREFETCH_MAX_PROGRAMS_PER_SM
        why = (f"auto: {per_sm:.2f} programs/SM {'<' if prefetch else '>='} {AUTO_PREFETCH_MAX_PROGRAMS_PER_SM:g}"
               f" -> prefetch {'on' if prefetch else 'off'}")
    if prefetch:
        why += f" d={distance}"
    return LaunchPlan(num_splits=num_splits, tiles_per_split=tiles_per_split, block_n=block_n, num_warps=4,
                      num_stages=num_stages, prefetch=prefetch, prefetch_distance=distance,
                      num_programs=num_programs, programs_per_sm=per_sm, shared_memory_bytes=smem,
                      why=f"{why}; {num_splits} splits x {tiles_per_split} tiles of {block_n} keys{tile_why} ({split_why}); "
                          f"{_stages(num_stages)} ({stages_why}), ~{smem >> 10} KiB shared memory")


def _stages(num_stages: int) -> str:
    return f"{num_stages} stage{'s' if num_stages != 1 else ''}"


@dataclass(frozen=True)
class Variant:
    """One point of the prefetch study: the config that asks for it and the plan it runs."""

    name: str
    config: DecodeAttentionConfig
    plan: LaunchPlan


def variant_grid(batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int, num_sms: int, *,
                 element_bytes: int = 2, base: DecodeAttentionConfig = DecodeAttentionConfig(),
                 interpret: bool = False, shallow_tiles: tuple[int, ...] = (),
                 shared_memory_bytes: int = HOPPER_SHARED_MEMORY_BYTES) -> tuple[Variant, ...]:
    """Every pipeline depth (1, 2, 3 stages) x prefetch (off, on 1 tile ahead, on 2 tiles ahead) for one shape, the
    splits and tiles as `base` plans them: 9 variants (prefetch off has no distance). For benches.

    shallow_tiles: also, at depth 1, the three prefetch settings with each of these tile lengths (keys per tile,
    named "stages=1 tile=N prefetch=..."): the latency-bound kernel the seed paper prefetched for, one small tile
    in flight per program and no pipeline, where the planned large tiles keep more bytes in flight."""
    variants = []
    grid = [(num_stages, None) for num_stages in (1, 2, 3)] + [(1, tile) for tile in shallow_tiles]
    for num_stages, tile in grid:
        for prefetch, distance in (("off", 1), ("on", 1), ("on", 2)):
            config = dataclasses.replace(base, num_stages=num_stages, prefetch=prefetch, prefetch_distance=distance,
                                         **({"block_n": tile} if tile is not None else {}))
            plan = choose_launch(batch, num_kv_heads, max_seq_len, head_dim, num_sms, config,
                                 element_bytes=element_bytes, interpret=interpret,
                                 shared_memory_bytes=shared_memory_bytes)
            name = (f"stages={num_stages}{'' if tile is None else f' tile={tile}'} "
                    f"prefetch={'off' if prefetch == 'off' else f'd{distance}'}")
            variants.append(Variant(name=name, config=config, plan=plan))
    return tuple(variants)


MIN_PREFETCH_CAPABILITY = (9, 0)  # cp.async.bulk: Hopper (sm_90) and newer; ptxas refuses it for sm_80 / sm_89


def capability_refusal(capability: tuple[int, int]) -> str | None:
    """Why a GPU of this compute capability cannot run the bulk L2 prefetch (None: it can)."""
    if tuple(capability) >= MIN_PREFETCH_CAPABILITY:
        return None
    major, minor = capability
    return (f"this GPU (sm_{major}{minor}) has no bulk L2 prefetch: cp.async.bulk.prefetch.L2 needs sm_90 (Hopper) "
            "or newer")


@functools.lru_cache(maxsize=None)
def _device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def device_refusal(device: torch.device | str) -> str | None:
    """`capability_refusal` of a CUDA device (cached per device); None for any other device (the interpreter gates
    the inline PTX itself)."""
    device = torch.device(device)
    return capability_refusal(_device_capability(device)) if device.type == "cuda" else None


def prefetch_refusal(k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why a bulk L2 prefetch cannot read this segment's key rows (None: it can): it needs a GPU of sm_90 or newer
    (`device_refusal`) and one contiguous, 16-byte aligned run of rows. Reads only the device's capability, shapes,
    strides and addresses."""
    if (why := device_refusal(k.device)) is not None:
        return why
    head_dim, element_bytes = k.shape[3], k.element_size()
    for name, t in (("key", k), ("value", v)):
        if t.shape[2] > 1 and t.stride(2) != head_dim:
            return (f"{name} rows of this segment are strided (row stride {t.stride(2)} elements), a bulk prefetch "
                    "needs contiguous rows")
        starts = (t.data_ptr(), t.stride(0) * element_bytes, t.stride(1) * element_bytes, head_dim * element_bytes)
        if any(s % 16 for s in starts):
            return f"{name} rows of this segment are not 16-byte aligned, a bulk prefetch needs aligned rows"
    return None
