"""The Triton decode-attention kernel (interpreter, prefetch off) against the torch reference, and its plan."""

import os

# triton.jit picks the interpreter when a kernel module is imported: set this before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.decode_attention import (  # noqa: E402
    AUTO_PREFETCH_MAX_PROGRAMS_PER_SM,
    DecodeAttentionConfig,
    _interpreting,
    choose_launch,
    decode_attention,
    decode_attention_reference,
)

pytestmark = pytest.mark.skipif(
    not _interpreting(),
    reason="triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1 in the environment",
)

_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(batch, num_heads, num_kv_heads, max_seq_len, head_dim, dtype, seq_lens, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, num_kv_heads, max_seq_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, num_kv_heads, max_seq_len, head_dim, generator=gen).to(dtype)
    for b, n in enumerate(seq_lens):  # keys past each length must never be read
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return q, k, v, torch.tensor(seq_lens, dtype=torch.int32)


def _check(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= _TOL[dtype], f"max abs error {err:.3g} > {_TOL[dtype]}"


# (batch, Hq, Hkv, S_max, D, dtype, seq_lens, num_splits); GQA ratio = Hq / Hkv
CASES = [
    (1, 2, 2, 1, 64, torch.float32, [1], None),
    (1, 4, 1, 17, 128, torch.bfloat16, [17], 1),
    (2, 8, 1, 54, 64, torch.float32, [54, 33], None),
    (3, 4, 1, 97, 128, torch.float32, [97, 1, 60], 4),
    (1, 2, 2, 1000, 128, torch.bfloat16, [1000], 40),
    (4, 8, 2, 1000, 64, torch.float32, [1000, 17, 1, 513], None),
    (2, 1, 1, 97, 64, torch.bfloat16, [97, 54], 1),
    (2, 10, 2, 54, 128, torch.float32, [54, 20], 2),
    (2, 16, 2, 97, 128, torch.bfloat16, [1, 97], 3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-S{c[3]}-D{c[4]}-{str(c[5])[6:]}-splits{c[7]}")
def test_matches_reference(case):
    batch, num_heads, num_kv_heads, max_seq_len, head_dim, dtype, seq_lens, num_splits = case
    q, k, v, lens = _inputs(batch, num_heads, num_kv_heads, max_seq_len, head_dim, dtype, seq_lens)
    out = decode_attention(q, k, v, lens, config=DecodeAttentionConfig(num_splits=num_splits, prefetch="on"))
    _check(out, decode_attention_reference(q, k, v, lens), dtype)


@pytest.mark.parametrize("num_splits", [1, None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 4, 8])
def test_mixed_lengths_matrix(gqa, head_dim, dtype, num_splits):
    seq_lens = [1, 17, 54, 97, 1000]
    q, k, v, lens = _inputs(len(seq_lens), gqa, 1, 1000, head_dim, dtype, seq_lens, seed=gqa + head_dim)
    out = decode_attention(q, k, v, lens, config=DecodeAttentionConfig(num_splits=num_splits))
    _check(out, decode_attention_reference(q, k, v, lens), dtype)


@pytest.mark.parametrize("block_n", [16, 32, 128])
def test_tile_sizes(block_n):
    q, k, v, lens = _inputs(3, 8, 2, 300, 128, torch.bfloat16, [300, 129, 1], seed=block_n)
    out = decode_attention(q, k, v, lens, config=DecodeAttentionConfig(block_n=block_n, num_splits=2))
    _check(out, decode_attention_reference(q, k, v, lens), torch.bfloat16)


def test_strided_cache_out_buffer_and_scale():
    # cache stored (B, S, Hkv, D) and viewed as (B, Hkv, S, D); q a slice of a wider projection
    q_wide = torch.randn(2, 8, 3 * 64)
    q = q_wide[:, :, 64:128]
    k = torch.randn(2, 70, 2, 64).transpose(1, 2)
    v = torch.randn(2, 80, 2, 64).transpose(1, 2)[:, :, :70]
    lens = torch.tensor([70, 23], dtype=torch.int32)
    out = torch.full((2, 8, 64), float("nan"))
    got = decode_attention(q, k, v, lens, sm_scale=0.3, out=out, config=DecodeAttentionConfig(num_splits=3))
    assert got is out
    _check(out, decode_attention_reference(q, k, v, lens, sm_scale=0.3), torch.float32)


def test_launcher_rejects_bad_inputs():
    q, k, v, lens = _inputs(1, 4, 2, 8, 64, torch.float32, [8])
    with pytest.raises(AssertionError):
        decode_attention(q, k, v, lens.long())
    with pytest.raises(AssertionError):
        decode_attention(q, k, v.double(), lens)
    with pytest.raises(AssertionError):
        decode_attention(q[:, :3], k, v, lens)  # 3 query heads on 2 KV heads


def test_plan_forces_prefetch_off_under_interpreter():
    plan = choose_launch(1, 8, 32768, 128, 132, DecodeAttentionConfig(prefetch="on"), interpret=True)
    assert not plan.prefetch and "TRITON_INTERPRET" in plan.why


@pytest.mark.parametrize("batch, num_kv_heads, max_seq_len", [(1, 8, 32768), (1, 1, 256), (4, 8, 8192)])
def test_auto_prefetch_follows_occupancy(batch, num_kv_heads, max_seq_len):
    plan = choose_launch(batch, num_kv_heads, max_seq_len, 128, 132, DecodeAttentionConfig(prefetch="auto"))
    assert plan.prefetch == (plan.programs_per_sm < AUTO_PREFETCH_MAX_PROGRAMS_PER_SM), plan.why
    assert "auto" in plan.why


def test_auto_prefetch_on_when_grid_is_small_and_off_when_full():
    small = choose_launch(1, 1, 256, 128, 132, DecodeAttentionConfig(prefetch="auto"))
    assert small.num_programs < 132 and small.prefetch
    full = choose_launch(64, 8, 4096, 128, 132, DecodeAttentionConfig(prefetch="auto"))
    assert full.programs_per_sm >= AUTO_PREFETCH_MAX_PROGRAMS_PER_SM and not full.prefetch
    assert choose_launch(1, 1, 256, 128, 132, DecodeAttentionConfig(prefetch="off")).prefetch is False
    forced = choose_launch(64, 8, 4096, 128, 132, DecodeAttentionConfig(prefetch="on", prefetch_distance=2))
    assert forced.prefetch and forced.prefetch_distance == 2


@pytest.mark.parametrize("batch, num_kv_heads, max_seq_len, head_dim", [
    (1, 8, 32768, 128), (1, 32, 8192, 128), (8, 32, 16384, 128), (32, 32, 4096, 128), (128, 8, 2048, 128),
    (4, 8, 8192, 128), (1, 1, 1, 64), (3, 2, 97, 64), (2, 4, 100000, 64),
])
def test_splits_fill_the_gpu_and_none_is_empty(batch, num_kv_heads, max_seq_len, head_dim):
    num_sms = 132
    plan = choose_launch(batch, num_kv_heads, max_seq_len, head_dim, num_sms)
    num_tiles = -(-max_seq_len // plan.block_n)
    rows = batch * num_kv_heads
    assert (plan.num_splits - 1) * plan.tiles_per_split < num_tiles <= plan.num_splits * plan.tiles_per_split
    assert plan.num_programs == rows * plan.num_splits
    if rows >= num_sms:
        assert plan.num_splits == 1  # enough programs already: no merge needed
    elif plan.tiles_per_split > 4:  # long enough to split freely: about one program per SM, never more
        assert num_sms - rows < plan.num_programs <= num_sms, plan.why
    assert plan.tiles_per_split >= min(4, num_tiles)


def test_big_tiles_only_for_many_waves_of_16_bit_programs():
    big = choose_launch(128, 8, 2048, 128, 132)  # 1024 programs: 7.8 waves
    assert big.block_n == 128 and big.num_stages == 3
    assert choose_launch(128, 8, 2048, 128, 132, element_bytes=4).block_n == 64  # fp32: keep 32 KiB tiles
    assert choose_launch(2, 8, 2048, 128, 132).block_n == 64  # 16 programs: a big tile would idle SMs
    fp32_big = choose_launch(1, 8, 4096, 128, 132, DecodeAttentionConfig(block_n=128), element_bytes=4)
    assert fp32_big.num_stages == 2  # 64 KiB tiles: one tile of K and V in flight fits shared memory


def test_split_override_is_clamped_to_tiles():
    assert choose_launch(1, 8, 4096, 128, 132, DecodeAttentionConfig(num_splits=7)).num_splits == 7
    assert choose_launch(1, 8, 100, 128, 132, DecodeAttentionConfig(num_splits=50, block_n=64)).num_splits == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(prefetch="yes"), "prefetch must be"),
    (dict(prefetch_distance=3), "prefetch_distance"),
    (dict(num_splits=0), "num_splits"),
    (dict(block_n=48), "block_n"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeAttentionConfig(**kwargs)


@pytest.mark.parametrize("args, message", [
    ((0, 8, 1024, 128, 132), "batch"),
    ((1, 8, 1024, 96, 132), "head_dim"),
    ((1, 8, 0, 128, 132), "max_seq_len"),
    ((1, 8, 1024, 128, 0), "num_sms"),
])
def test_choose_launch_rejects_bad_shapes(args, message):
    with pytest.raises(ValueError, match=message):
        choose_launch(*args, DecodeAttentionConfig())
    with pytest.raises(ValueError, match="element_bytes"):
        choose_launch(1, 8, 1024, 128, 132, element_bytes=1)


def test_config_is_frozen():
    config = DecodeAttentionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.prefetch = "on"
    assert dataclasses.replace(config, prefetch="off").prefetch == "off"
