"""The Triton decode-attention kernel (interpreter, prefetch off) against the torch reference, and its plans.

Every fast path over awkward shapes: lengths 1, 54, 97 (not multiples of a tile) mixed in a batch, GQA ratios 1-8,
head dims 16-256 (a few per test, so the interpreter stays fast), windows cutting inside a segment and before it,
soft-capping, 2-3 segments in the engine's layouts (a slice of a (L, B, Hkv, S, D) cache, a position-major staging
view (S, B, 2, Hkv, D), a token-major (B, S, Hkv, D) view), sequences that see nothing of a segment, and a strided
view whose key offsets pass 2^31 elements. Outputs are NaN-poisoned before each run and every key a sequence must
not see is NaN, so unwritten rows and stray reads fail. Errors are per (sequence, head) row, relative to a float64
reference: fp32 under 1e-4 (far under 1e-3), bf16 under 1e-2.
"""

import os

# triton.jit picks the interpreter when a kernel module is imported: set this before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.decode_attention import (  # noqa: E402
    AUTO_PREFETCH_MAX_PROGRAMS_PER_SM,
    HOPPER_SHARED_MEMORY_BYTES,
    DecodeAttentionConfig,
    _interpreting,
    choose_launch,
    decode_attention,
    decode_attention_reference,
    decode_attention_segments,
    decode_attention_segments_reference,
    plan_segments,
)
from kernels.segments import KVSegment, visible_keys  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _interpreting(),
    reason="triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1 in the environment",
)

_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _poison_invisible(segments, seq_lens, window):
    """NaN into every slot a sequence must not see: a kernel that reads one fails."""
    for seg in segments:
        hidden = ~visible_keys(seq_lens, seg, window=window)  # (B, S)
        for t in (seg.k, seg.v):
            t.transpose(1, 2)[hidden] = float("nan")


def _segment(layout, batch, num_kv_heads, start, num_slots, head_dim, dtype, gen):
    """A segment of `num_slots` slots from `start` in one of the engine's layouts, random K/V."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if layout == "cache":  # layer 1 of a (L, B, Hkv, S_max, D) cache, slots [0, num_slots) of S_max
        k, v = rand(2, batch, num_kv_heads, num_slots + 7, head_dim), rand(2, batch, num_kv_heads, num_slots + 7, head_dim)
        return KVSegment(k[1, :, :, :num_slots], v[1, :, :, :num_slots], start)
    if layout == "staged":  # position-major staging (S, B, 2, Hkv, D): key rows B * 2 * Hkv * D apart
        buf = rand(num_slots, batch, 2, num_kv_heads, head_dim)
        return KVSegment(buf[:, :, 0].permute(1, 2, 0, 3), buf[:, :, 1].permute(1, 2, 0, 3), start)
    if layout == "token_major":  # (B, S, Hkv, D) seen as (B, Hkv, S, D)
        return KVSegment(rand(batch, num_slots, num_kv_heads, head_dim).transpose(1, 2),
                         rand(batch, num_slots, num_kv_heads, head_dim).transpose(1, 2), start)
    raise ValueError(layout)


def _inputs(batch, num_heads, num_kv_heads, max_seq_len, head_dim, dtype, seq_lens, *, window=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, num_kv_heads, max_seq_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, num_kv_heads, max_seq_len, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    _poison_invisible([KVSegment(k, v, 0)], lens, window)
    return q, k, v, lens


def _check(out, ref, dtype):
    """Relative error of every (sequence, head) row against the float64 reference; NaN never passes."""
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1).clamp_min(1e-30)
    worst = err.max().item()
    assert worst <= _TOL[dtype], f"worst row relative error {worst:.3g} > {_TOL[dtype]} (row {divmod(err.argmax().item(), err.shape[1])})"


class _NoMergeLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the merge kernel was launched: the in-kernel merge should have merged")


def _run(q, k, v, lens, **kwargs):
    out = torch.full_like(q, float("nan"))
    got = decode_attention(q, k, v, lens, out=out, **kwargs)
    assert got is out
    return out


# (batch, Hq, Hkv, S_max, D, dtype, seq_lens, num_splits, window, softcap); GQA ratio = Hq / Hkv
CASES = [
    (1, 2, 2, 1, 64, torch.float32, [1], None, None, None),
    (1, 4, 1, 17, 128, torch.bfloat16, [17], 1, None, None),
    (2, 8, 1, 54, 64, torch.float32, [54, 33], None, None, None),
    (3, 4, 1, 97, 128, torch.float32, [97, 1, 60], 4, None, None),
    (1, 2, 2, 1000, 128, torch.bfloat16, [1000], 40, None, None),
    (4, 8, 2, 1000, 64, torch.float32, [1000, 17, 1, 513], None, None, None),
    (2, 1, 1, 97, 64, torch.bfloat16, [97, 54], 1, None, None),
    (2, 10, 2, 54, 128, torch.float32, [54, 20], 2, None, None),
    (2, 16, 2, 97, 128, torch.bfloat16, [1, 97], 3, None, None),
    (3, 8, 4, 97, 80, torch.float32, [97, 1, 54], 3, 32, None),  # window inside the keys; a length-1 row
    (3, 8, 1, 300, 96, torch.bfloat16, [300, 129, 1], None, 97, 30.0),
    (2, 4, 2, 97, 40, torch.float16, [97, 54], 2, None, 50.0),
    (3, 16, 2, 54, 24, torch.float32, [54, 2, 31], None, 1, None),  # window 1: the query's own key only
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-S{c[3]}-D{c[4]}-{str(c[5])[6:]}-splits{c[7]}-w{c[8]}-cap{c[9]}")
def test_matches_reference(case):
    batch, num_heads, num_kv_heads, max_seq_len, head_dim, dtype, seq_lens, num_splits, window, softcap = case
    q, k, v, lens = _inputs(batch, num_heads, num_kv_heads, max_seq_len, head_dim, dtype, seq_lens, window=window)
    out = _run(q, k, v, lens, window=window, softcap=softcap,
               config=DecodeAttentionConfig(num_splits=num_splits, prefetch="on"))
    _check(out, decode_attention_reference(q.double(), k, v, lens, window=window, softcap=softcap), dtype)


# Every head dim the engine's models have (and odd widths below 16), each beside a GQA ratio; mixed lengths 1, 54, 97.
HEAD_DIMS = [(1, 2), (7, 1), (16, 1), (24, 2), (40, 8), (64, 4), (80, 1), (96, 4), (128, 8), (256, 2)]


@pytest.mark.parametrize("num_splits", [1, None])
@pytest.mark.parametrize("head_dim, gqa", HEAD_DIMS, ids=[f"D{d}-gqa{g}" for d, g in HEAD_DIMS])
def test_every_head_dim_and_gqa_ratio(head_dim, gqa, num_splits):
    dtype = torch.bfloat16 if head_dim in (24, 64, 96, 256) else torch.float32
    q, k, v, lens = _inputs(3, 2 * gqa, 2, 97, head_dim, dtype, [97, 1, 54], seed=head_dim + gqa)
    out = _run(q, k, v, lens, config=DecodeAttentionConfig(num_splits=num_splits, block_n=32))
    _check(out, decode_attention_reference(q.double(), k, v, lens), dtype)


@pytest.mark.parametrize("num_splits", [1, None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gqa", [1, 8])
def test_mixed_lengths_matrix(gqa, dtype, num_splits):
    seq_lens = [1, 17, 54, 97, 1000]
    q, k, v, lens = _inputs(len(seq_lens), gqa, 1, 1000, 128, dtype, seq_lens, seed=gqa)
    out = _run(q, k, v, lens, config=DecodeAttentionConfig(num_splits=num_splits))
    _check(out, decode_attention_reference(q.double(), k, v, lens), dtype)


@pytest.mark.parametrize("block_n", [16, 32, 128])
def test_tile_sizes(block_n):
    q, k, v, lens = _inputs(3, 8, 2, 300, 128, torch.bfloat16, [300, 129, 1], seed=block_n)
    out = _run(q, k, v, lens, config=DecodeAttentionConfig(block_n=block_n, num_splits=2))
    _check(out, decode_attention_reference(q.double(), k, v, lens), torch.bfloat16)


def test_strided_cache_out_buffer_and_scale():
    # cache stored (B, S, Hkv, D) and viewed as (B, Hkv, S, D); q a slice of a wider projection
    q_wide = torch.randn(2, 8, 3 * 64)
    q = q_wide[:, :, 64:128]
    k = torch.randn(2, 70, 2, 64).transpose(1, 2)
    v = torch.randn(2, 80, 2, 64).transpose(1, 2)[:, :, :70]
    lens = torch.tensor([70, 23], dtype=torch.int32)
    out = torch.full((2, 8, 3 * 64), float("nan"))[:, :, 64:128]  # a strided output too
    got = decode_attention(q, k, v, lens, sm_scale=0.3, out=out, config=DecodeAttentionConfig(num_splits=3))
    assert got is out
    _check(out, decode_attention_reference(q.double(), k, v, lens, sm_scale=0.3), torch.float32)


# -- segments ---------------------------------------------------------------------------------------------------
# (layouts with their slot counts, seq_lens, window, softcap, Hq, Hkv, D, dtype): segments tile [0, sum of slots).
SEGMENT_CASES = [
    # GPU-resident [0, 40) + staged [40, 100): a row ending inside the first (it sees nothing of the second)
    ((("cache", 40), ("staged", 60)), [100, 30, 41, 1], None, None, 8, 2, 64, torch.float32),
    # window cutting inside the staged segment (row 0) and before it (row 1: it sees the staged one only)
    ((("cache", 40), ("staged", 60)), [100, 97, 45, 12], 20, None, 8, 2, 128, torch.bfloat16),
    # three segments, GQA 8, soft-capped; window 54 cuts the cache slice for the long row, not for the short
    ((("cache", 33), ("staged", 31), ("token_major", 33)), [97, 54, 1], 54, 20.0, 16, 2, 80, torch.float32),
    ((("staged", 54), ("cache", 43)), [97, 54, 55], None, 5.0, 4, 4, 24, torch.bfloat16),
    ((("cache", 97), ("staged", 97), ("token_major", 60)), [254, 97, 98, 200], 97, None, 2, 1, 256, torch.bfloat16),
]


@pytest.mark.parametrize("merge", ["launch", "in-kernel"])
@pytest.mark.parametrize("num_splits", [1, None])
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=lambda c: "+".join(f"{l}{n}" for l, n in c[0]) + f"-D{c[6]}-w{c[2]}-cap{c[3]}")
def test_segments_match_reference(case, num_splits, merge, monkeypatch):
    """In-kernel merge: each segment launches its split kernel; the tickets count over all of them, so a row merges
    once, in the last launch, over every segment's splits (rows that see nothing of a segment included)."""
    import kernels.decode_attention as da

    if merge == "in-kernel":
        monkeypatch.setattr(da, "_merge_kernel", _NoMergeLaunch())
    layouts, seq_lens, window, softcap, num_heads, num_kv_heads, head_dim, dtype = case
    gen = torch.Generator().manual_seed(len(layouts) + head_dim)
    batch, segments, start = len(seq_lens), [], 0
    for layout, num_slots in layouts:
        segments.append(_segment(layout, batch, num_kv_heads, start, num_slots, head_dim, dtype, gen))
        start += num_slots
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    _poison_invisible(segments, lens, window)
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    got = decode_attention_segments(q, segments, lens, window=window, softcap=softcap, out=out,
                                    config=DecodeAttentionConfig(num_splits=num_splits, block_n=16), merge=merge)
    assert got is out
    _check(out, decode_attention_segments_reference(q.double(), segments, lens, window=window, softcap=softcap), dtype)
    if merge == "in-kernel":
        assert not da._MERGE_TICKETS[q.device].any()  # every row's counter is back at zero for the next call


def test_segments_equal_one_cache():
    # The same K/V cut into a cache slice and a staged view gives what the whole cache gives.
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 8, 64, generator=gen), torch.randn(3, 2, 97, 64, generator=gen), torch.randn(3, 2, 97, 64, generator=gen)
    lens = torch.tensor([97, 54, 1], dtype=torch.int32)
    staged = torch.stack((k[:, :, 40:], v[:, :, 40:]), dim=2).permute(3, 0, 2, 1, 4).contiguous()  # (57, B, 2, Hkv, D)
    segments = [KVSegment(k[:, :, :40], v[:, :, :40], 0),
                KVSegment(staged[:, :, 0].permute(1, 2, 0, 3), staged[:, :, 1].permute(1, 2, 0, 3), 40)]
    for window, softcap in ((None, None), (30, 10.0)):
        whole = decode_attention(q, k, v, lens, window=window, softcap=softcap)
        parts = decode_attention_segments(q, segments, lens, window=window, softcap=softcap)
        assert (whole - parts).abs().max().item() < 1e-5


def test_a_row_that_sees_no_key_of_a_segment_weighs_nothing():
    # Row 1 ends before the staged segment starts; row 0's window starts after the cache slice ends.
    gen = torch.Generator().manual_seed(5)
    segments = [_segment("cache", 2, 1, 0, 16, 64, torch.float32, gen), _segment("staged", 2, 1, 16, 16, 64, torch.float32, gen)]
    lens = torch.tensor([32, 10], dtype=torch.int32)
    _poison_invisible(segments, lens, 8)
    q = torch.randn(2, 2, 64, generator=gen)
    out = decode_attention_segments(q, segments, lens, window=8)
    _check(out, decode_attention_segments_reference(q.double(), segments, lens, window=8), torch.float32)
    assert torch.allclose(out[0], decode_attention_segments(q[:1], [KVSegment(segments[1].k[:1], segments[1].v[:1], 16)],
                                                            lens[:1], window=8)[0], atol=1e-6)


def test_empty_segments_are_skipped():
    gen = torch.Generator().manual_seed(6)
    seg = _segment("cache", 1, 1, 0, 20, 32, torch.float32, gen)
    empty = KVSegment(seg.k[:, :, :0], seg.v[:, :, :0], 20)
    plans = plan_segments([seg, empty], num_sms=132, interpret=False, tuning=None)
    assert [p.segment for p in plans] == [0]
    q = torch.randn(1, 2, 32, generator=gen)
    lens = torch.tensor([20], dtype=torch.int32)
    _check(decode_attention_segments(q, [seg, empty], lens), decode_attention_reference(q.double(), seg.k, seg.v, lens), torch.float32)
    with pytest.raises(ValueError, match="every K/V segment is empty"):
        plan_segments([empty])


def test_offsets_past_2_31_elements():
    """A key view whose row stride fits int32 but whose largest key offset is past 2^31 elements, as a staged
    segment's is at B*S ~ 262K tokens. With 32-bit offsets the kernel reads the wrong rows (measured: relative
    error 0.24 against the reference); the reads land inside the storage, which starts 2^31 elements before the
    view, so they do not crash. The storage (9.5 GB) is allocated lazily: only the rows written cost memory."""
    batch, num_heads, num_kv_heads, num_slots, head_dim = 1, 2, 1, 40, 64
    row_stride = (1 << 26) + 2 * head_dim  # < 2^31, but key 32 onwards sits past 2^31
    view_start = 1 << 31
    assert row_stride < 2**31 < (num_slots - 1) * row_stride + head_dim < 2**32
    storage = torch.empty(view_start + (num_slots - 1) * row_stride + 2 * head_dim, dtype=torch.bfloat16)
    try:
        shape, strides = (batch, num_kv_heads, num_slots, head_dim), (0, 0, row_stride, 1)
        k = storage.as_strided(shape, strides, view_start)
        v = storage.as_strided(shape, strides, view_start + head_dim)  # rows of [K | V]
        gen = torch.Generator().manual_seed(11)
        k.copy_(torch.randn(shape, generator=gen))
        v.copy_(torch.randn(shape, generator=gen))
        q = torch.randn(batch, num_heads, head_dim, generator=gen).to(torch.bfloat16)
        lens = torch.tensor([num_slots], dtype=torch.int32)
        for num_splits in (1, 3):
            out = _run(q, k, v, lens, config=DecodeAttentionConfig(num_splits=num_splits, block_n=16))
            _check(out, decode_attention_reference(q.double(), k, v, lens), torch.bfloat16)
        # the same view as the staged segment after a GPU-resident one, windowed
        head = _segment("cache", batch, num_kv_heads, 0, 24, head_dim, torch.bfloat16, gen)
        segments = [head, KVSegment(k, v, 24)]
        lens = torch.tensor([24 + num_slots], dtype=torch.int32)
        out = torch.full_like(q, float("nan"))
        decode_attention_segments(q, segments, lens, window=48, out=out)
        _check(out, decode_attention_segments_reference(q.double(), segments, lens, window=48), torch.bfloat16)
    finally:
        del storage, k, v
        gc.collect()


def test_launcher_rejects_bad_inputs():
    q, k, v, lens = _inputs(1, 4, 2, 8, 64, torch.float32, [8])
    with pytest.raises(AssertionError):
        decode_attention(q, k, v, lens.long())
    with pytest.raises(AssertionError):
        decode_attention(q, k, v.double(), lens)
    with pytest.raises(AssertionError):
        decode_attention(q[:, :3], k, v, lens)  # 3 query heads on 2 KV heads
    with pytest.raises(AssertionError):
        decode_attention(q, k, v, lens, window=0)
    with pytest.raises(AssertionError):
        decode_attention(q, k, v, lens, softcap=-1.0)
    with pytest.raises(AssertionError):
        decode_attention(torch.randn(1, 4, 300), torch.randn(1, 2, 8, 300), torch.randn(1, 2, 8, 300), lens)
    other = KVSegment(torch.randn(1, 1, 8, 64), torch.randn(1, 1, 8, 64), 8)  # a different KV head count
    with pytest.raises(AssertionError, match="same KV heads"):
        decode_attention_segments(q, [KVSegment(k, v, 0), other], lens)


# -- plans ------------------------------------------------------------------------------------------------------
def test_plan_forces_prefetch_off_under_interpreter():
    plan = choose_launch(1, 8, 32768, 128, 132, DecodeAttentionConfig(prefetch="on"), interpret=True)
    assert not plan.prefetch and "TRITON_INTERPRET" in plan.why


def test_strided_segments_plan_prefetch_off_and_say_why():
    gen = torch.Generator().manual_seed(0)
    cache = _segment("cache", 4, 8, 0, 100, 128, torch.bfloat16, gen)
    staged = _segment("staged", 4, 8, 100, 50, 128, torch.bfloat16, gen)
    plans = plan_segments([cache, staged], num_sms=132, interpret=False, tuning=None, config=DecodeAttentionConfig(prefetch="on"))
    assert [p.segment for p in plans] == [0, 1]
    assert plans[0].prefetch and "prefetch on (asked)" in plans[0].why
    row_stride = 4 * 2 * 8 * 128
    assert not plans[1].prefetch
    assert (f"prefetch off: key rows of this segment are strided (row stride {row_stride} elements), a bulk "
            "prefetch needs contiguous rows") in plans[1].why
    assert "segment 1 (slots 100..149" in plans[1].why


def test_window_plans_splits_over_the_window_only():
    gen = torch.Generator().manual_seed(0)
    seg = _segment("cache", 1, 8, 0, 32768, 16, torch.bfloat16, gen)
    full, = plan_segments([seg], num_sms=132, interpret=False, tuning=None)
    windowed, = plan_segments([seg], window=4096, num_sms=132, interpret=False, tuning=None)
    assert windowed.num_splits * windowed.tiles_per_split * windowed.block_n >= 4096
    assert windowed.tiles_per_split * windowed.block_n < full.tiles_per_split * full.block_n
    assert "4096 keys planned" in windowed.why


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
    (4, 8, 8192, 128), (1, 1, 1, 64), (3, 2, 97, 64), (2, 4, 100000, 64), (1, 8, 32768, 256), (4, 4, 9000, 80),
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
    assert big.block_n == 128 and big.num_stages == 2  # 32 KiB tiles on a full grid: two stages (measured on an H200)
    assert choose_launch(128, 8, 2048, 128, 132, element_bytes=4).block_n == 64  # fp32: keep 32 KiB tiles
    assert choose_launch(2, 8, 2048, 128, 132).block_n == 64  # 16 programs: a big tile would idle SMs
    fp32_big = choose_launch(1, 8, 4096, 128, 132, DecodeAttentionConfig(block_n=128), element_bytes=4)
    assert fp32_big.num_stages == 2  # 64 KiB tiles: one tile of K and V in flight fits shared memory


@pytest.mark.parametrize("head_dim, element_bytes, block_n", [(16, 2, 128), (24, 2, 128), (40, 4, 128), (80, 2, 64),
                                                              (96, 4, 64), (256, 2, 32), (256, 4, 32)])
def test_any_head_dim_plans_16_kib_tiles_that_fit_shared_memory(head_dim, element_bytes, block_n):
    plan = choose_launch(2, 8, 4096, head_dim, 132, element_bytes=element_bytes)
    assert plan.block_n == block_n and plan.num_stages == 3, plan.why
    assert plan.shared_memory_bytes <= HOPPER_SHARED_MEMORY_BYTES
    asked = choose_launch(2, 8, 4096, head_dim, 132, DecodeAttentionConfig(block_n=128), element_bytes=element_bytes)
    assert asked.shared_memory_bytes <= HOPPER_SHARED_MEMORY_BYTES and asked.num_stages >= 1, asked.why
    if asked.block_n < 128:  # only fp32 D=256: a 128 KiB tile cannot be held even once, and the plan says so
        assert (head_dim, element_bytes) == (256, 4) and "128-key tiles 1 stage deep overflow" in asked.why, asked.why
    big = choose_launch(128, 8, 2048, 256, 132)  # many waves of 16-bit D=256: 32 KiB tiles, still 3 stages
    assert big.block_n == 64 and big.num_stages == 3 and big.shared_memory_bytes <= HOPPER_SHARED_MEMORY_BYTES


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
    ((1, 8, 1024, 0, 132), "head_dim"),
    ((1, 8, 1024, 257, 132), "head_dim"),
    ((1, 8, 0, 128, 132), "max_seq_len"),
    ((1, 8, 1024, 128, 0), "num_sms"),
])
def test_choose_launch_rejects_bad_shapes(args, message):
    with pytest.raises(ValueError, match=message):
        choose_launch(*args, DecodeAttentionConfig())
    with pytest.raises(ValueError, match="element_bytes"):
        choose_launch(1, 8, 1024, 128, 132, element_bytes=1)


def test_plan_segments_rejects_bad_windows_and_no_segments():
    with pytest.raises(ValueError, match="at least one"):
        plan_segments([])
    seg = KVSegment(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), 0)
    with pytest.raises(ValueError, match="window"):
        plan_segments([seg], window=0)


def test_config_is_frozen():
    config = DecodeAttentionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.prefetch = "on"
    assert dataclasses.replace(config, prefetch="off").prefetch == "off"


# -- the in-kernel merge (merge="in-kernel"): each row's last program merges its splits ------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if c[7] != 1], ids=lambda c: f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-S{c[3]}-D{c[4]}-{c[5]}-splits{c[7]}-w{c[8]}-cap{c[9]}")
def test_the_in_kernel_merge_equals_the_launched_one(case, monkeypatch):
    import kernels.decode_attention as da

    batch, num_heads, num_kv_heads, max_seq_len, head_dim, dtype, seq_lens, num_splits, window, softcap = case
    q, k, v, lens = _inputs(batch, num_heads, num_kv_heads, max_seq_len, head_dim, dtype, seq_lens, window=window)
    config = DecodeAttentionConfig(num_splits=num_splits or 4, block_n=16)
    launched = _run(q, k, v, lens, window=window, softcap=softcap, config=config, merge="launch")
    monkeypatch.setattr(da, "_merge_kernel", _NoMergeLaunch())
    plans = plan_segments([KVSegment(k, v, 0)], window=window, config=config, num_sms=da.sm_count(q.device))
    if sum(p.num_splits for p in plans) == 1:
        pytest.skip("one split: nothing to merge")
    merged = _run(q, k, v, lens, window=window, softcap=softcap, config=config, merge="in-kernel")
    _check(merged, decode_attention_reference(q.double(), k, v, lens, window=window, softcap=softcap), dtype)
    assert (merged.float() - launched.float()).abs().max().item() <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert not da._MERGE_TICKETS[q.device].any()  # every row's counter is back at zero for the next call


def test_rows_past_the_counters_merge_by_launch(monkeypatch):
    import kernels.decode_attention as da

    q, k, v, lens = _inputs(3, 4, 2, 97, 64, torch.float32, [97, 1, 60])
    config = DecodeAttentionConfig(num_splits=3, block_n=16)
    launched = _run(q, k, v, lens, config=config, merge="launch")
    monkeypatch.setattr(da, "MERGE_TICKET_ROWS", 5)  # 3 sequences x 2 KV heads = 6 rows: too many
    assert da.merge_tickets(q.device, 6) is None and da.merge_tickets(q.device, 5) is not None
    assert torch.equal(_run(q, k, v, lens, config=config, merge="in-kernel"), launched)
    with pytest.raises(AssertionError, match="merge must be one of"):
        _run(q, k, v, lens, config=config, merge="fused")


class _CountingLaunch:
    """Stands in for a jitted kernel: counts grid launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("num_splits, merged_in_kernel", [(2, True), (8, True), (9, False), (16, False)])
def test_auto_merges_in_the_kernel_up_to_its_split_limit(num_splits, merged_in_kernel, monkeypatch):
    import kernels.decode_attention as da

    assert da.chosen_merge("auto", num_splits) == ("in-kernel" if merged_in_kernel else "launch")
    assert da.chosen_merge("launch", 2) == "launch" and da.chosen_merge("in-kernel", 200) == "in-kernel"
    q, k, v, lens = _inputs(2, 4, 2, 16 * num_splits, 32, torch.float32, [16 * num_splits, 19])  # a tile per split
    config = DecodeAttentionConfig(num_splits=num_splits, block_n=16)
    launched = _run(q, k, v, lens, config=config, merge="launch")
    counting = _CountingLaunch(da._merge_kernel)
    monkeypatch.setattr(da, "_merge_kernel", counting)
    got = _run(q, k, v, lens, config=config)  # the default: auto
    assert counting.launches == (0 if merged_in_kernel else 1)
    assert (got - launched).abs().max().item() <= 1e-6
    _check(got, decode_attention_reference(q.double(), k, v, lens), torch.float32)


def test_a_refused_launch_clears_the_tickets_earlier_segments_took(monkeypatch):
    """Two segments, the second's launch refused after the first's programs took their tickets: the counters are
    cleared, so the next call merges at the right program and is exact."""
    import kernels.decode_attention as da
    from kernels.decode_attention import decode_attention_segments, decode_attention_segments_reference

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 32, generator=gen)
    segs = [KVSegment(torch.randn(2, 2, 40, 32, generator=gen), torch.randn(2, 2, 40, 32, generator=gen), 0),
            KVSegment(torch.randn(2, 2, 24, 32, generator=gen), torch.randn(2, 2, 24, 32, generator=gen), 40)]
    lens = torch.tensor([64, 50], dtype=torch.int32)
    config = DecodeAttentionConfig(num_splits=2, block_n=16)
    real = da._kernel

    class RefuseSecond:
        calls = 0

        def __getitem__(self, grid):
            RefuseSecond.calls += 1
            if RefuseSecond.calls == 2:
                raise RuntimeError("out of resources")
            return real[grid]

    monkeypatch.setattr(da, "_kernel", RefuseSecond())
    with pytest.raises(RuntimeError, match="out of resources"):
        decode_attention_segments(q, segs, lens, config=config, merge="in-kernel")
    assert not da._MERGE_TICKETS[q.device].any()
    monkeypatch.setattr(da, "_kernel", real)
    got = decode_attention_segments(q, segs, lens, config=config, merge="in-kernel")
    _check(got, decode_attention_segments_reference(q.double(), segs, lens), torch.float32)


@pytest.mark.parametrize("shape, block_n, num_splits", [
    ((1, 8, 32768), 128, 16),  # under-occupied, 16 tiles of 128 keys per split: the measured big-tile case
    ((4, 8, 8192), 128, 4),
    ((1, 32, 8192), 128, 4),
    ((1, 8, 2048), 64, 8),  # 16 tiles of 128 keys in all: under 8 per split at 16 splits, so 64-key tiles
    ((8, 32, 2048), 64, 1),  # 256 rows on 132 SMs: not under-occupied, under 3 waves
    ((128, 8, 2048), 128, 1),  # 1024 rows: 7.8 waves, 32 KiB tiles two stages deep
])
def test_under_occupied_long_rows_plan_32_kib_tiles(shape, block_n, num_splits):
    batch, num_kv_heads, seq_len = shape
    plan = choose_launch(batch, num_kv_heads, seq_len, 128, 132)
    stages = 2 if batch * num_kv_heads >= 3 * 132 else 3
    assert (plan.block_n, plan.num_splits, plan.num_stages) == (block_n, num_splits, stages), plan.why
    if batch * num_kv_heads < 132:  # head dim 256 on an under-occupied grid: not measured, 16 KiB tiles kept
        assert choose_launch(batch, num_kv_heads, seq_len, 256, 132).block_n == 32
