"""The in-place RoPE kernel (interpreter) against its torch reference: bit-identical in fp32, fp16 and bf16 over
awkward shapes, every even head dim (24, 40, 48, 80, 96 ... 256: not 2 * a power of two), partial rotary (dims past
the rotary dim untouched) and strided layouts (K inside a [K | V] staging row, every other head, heads-major),
neighbours untouched; the launcher refuses bad shapes and strides. bf16 is exact under the interpreter because the
kernel rounds bf16 by integer arithmetic (the interpreter's own fp32 -> bf16 cast truncates)."""

import os

# triton.jit picks the interpreter when a kernel module is imported: set this before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.decode_attention import _interpreting  # noqa: E402
from kernels.rope import rope_, rope_reference  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _interpreting(),
    reason="triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1 in the environment",
)


def _tables(num_positions: int, head_dim: int, dtype: torch.dtype, *, start: int = 0, row_pad: int = 0):
    """transformers' cos/sin rows (positions, R) for positions start.. (both halves equal, as its RoPE builds
    them), in `dtype`; `head_dim` is the rotary dim R; row_pad > 0 leaves them as views with a row stride of
    R + row_pad."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(start, start + num_positions, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    out = []
    for table in (emb.cos(), emb.sin()):
        buf = torch.full((num_positions, head_dim + row_pad), float("nan"), dtype=dtype)
        buf[:, :head_dim] = table.to(dtype)
        out.append(buf[:, :head_dim])
    return out


def _layout(rows: int, heads: int, dim: int, dtype: torch.dtype, layout: str, gen: torch.Generator):
    """-> (x (rows, H, D) view, the whole buffer it lives in)."""
    if layout == "contiguous":
        buf = torch.randn(rows, heads, dim, generator=gen).to(dtype)
        return buf, buf
    if layout == "kv_half":  # a staging row holds [K | V]: x is K, rows strided by 2 * H * D
        buf = torch.randn(rows, 2, heads, dim, generator=gen).to(dtype)
        return buf[:, 0], buf
    if layout == "every_other_head":  # head stride 2 * D
        buf = torch.randn(rows, 2 * heads, dim, generator=gen).to(dtype)
        return buf[:, ::2], buf
    if layout == "heads_major":  # (H, rows, D) seen as (rows, H, D): row stride D < head stride rows * D
        buf = torch.randn(heads, rows, dim, generator=gen).to(dtype)
        return buf.transpose(0, 1), buf
    raise ValueError(layout)


# (rows_per_position, positions, heads, head_dim): every value of each axis appears, with the large ones together;
# head dims 24, 40, 48, 80, 96 are not 2 * a power of two (their half is padded and masked).
SHAPES = [
    (1, 1, 1, 32),
    (1, 5, 3, 64),
    (1, 97, 8, 128),
    (3, 1, 32, 24),
    (3, 5, 1, 40),
    (3, 97, 3, 48),
    (8, 1, 8, 80),
    (8, 5, 32, 96),
    (8, 33, 4, 256),
]
LAYOUTS = ["contiguous", "kv_half", "every_other_head", "heads_major"]


CASES = [(shape, layout) for shape in SHAPES for layout in LAYOUTS]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,layout", CASES, ids=["rpp{}-P{}-H{}-D{}-{}".format(*s, l) for s, l in CASES])
def test_rope_matches_reference_bit_for_bit(shape, layout, dtype):
    rows_per_position, positions, heads, dim = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    rows = positions * rows_per_position
    cos, sin = _tables(positions, dim, dtype, start=1000 + positions)
    x, buf = _layout(rows, heads, dim, dtype, layout, gen)
    before = buf.clone()
    expected = rope_reference(x, cos, sin, rows_per_position=rows_per_position)
    assert expected.dtype == dtype
    out = rope_(x, cos, sin, rows_per_position=rows_per_position)
    assert out is x
    assert torch.equal(x, expected), (x.float() - expected.float()).abs().max()
    assert not torch.equal(x, _layout_view(before, layout))  # it did rotate something
    # Everything in the buffer outside x is untouched (the V half, the skipped heads).
    mask = torch.ones_like(buf, dtype=torch.bool)
    _layout_view(mask, layout).fill_(False)
    assert torch.equal(buf[mask], before[mask])


def _layout_view(buf: torch.Tensor, layout: str) -> torch.Tensor:
    return {"contiguous": lambda b: b, "kv_half": lambda b: b[:, 0], "every_other_head": lambda b: b[:, ::2],
            "heads_major": lambda b: b.transpose(0, 1)}[layout](buf)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rope_with_strided_tables_and_partial_blocks(dtype):
    # 65 rows (one past the interpreter's 64-row block), 5 heads (block of 8), tables with padded rows.
    rows_per_position, positions, heads, dim = 13, 5, 5, 64
    cos, sin = _tables(positions, dim, dtype, start=7, row_pad=16)
    assert cos.stride(0) == dim + 16 and not cos.is_contiguous()
    x, buf = _layout(positions * rows_per_position, heads, dim, dtype, "kv_half", torch.Generator().manual_seed(1))
    v_before = buf[:, 1].clone()
    expected = rope_reference(x, cos, sin, rows_per_position=rows_per_position)
    rope_(x, cos, sin, rows_per_position=rows_per_position)
    assert torch.equal(x, expected)
    assert torch.equal(buf[:, 1], v_before)


def test_rows_use_their_own_position():
    # Rows are slot-major: with 3 rows per position, rows 3p..3p+2 are rotated by position p's angles. On a
    # vector of ones the rotation gives cos - sin in the first half and cos + sin in the second.
    dim, positions, half = 32, 4, 16
    cos, sin = _tables(positions, dim, torch.float32)
    x = torch.ones(positions * 3, 1, dim)
    rope_(x, cos, sin, rows_per_position=3)
    for p in range(positions):
        want = torch.cat(((cos[p] - sin[p])[:half], (cos[p] + sin[p])[half:]))
        assert torch.equal(x[3 * p:3 * p + 3, 0], want.expand(3, -1)), p
    assert torch.equal(x[:3, 0], torch.ones(3, dim))  # position 0 is the identity


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_even_head_dim(dtype):
    gen = torch.Generator().manual_seed(7)
    for dim in range(2, 257, 2):
        cos, sin = _tables(3, dim, dtype, start=dim)
        x, buf = _layout(6, 2, dim, dtype, "kv_half", gen)
        v_before = buf[:, 1].clone()
        expected = rope_reference(x, cos, sin, rows_per_position=2)
        rope_(x, cos, sin, rows_per_position=2)
        assert torch.equal(x, expected), dim
        assert torch.equal(buf[:, 1], v_before), dim


# (head_dim, rotary_dim): Phi-2/GPT-NeoX-style partial rotary (a quarter, a half), odd halves, the smallest.
PARTIAL = [(128, 64), (80, 32), (96, 24), (256, 64), (64, 2), (40, 38), (48, 20)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim, rotary_dim", PARTIAL, ids=[f"D{d}-R{r}" for d, r in PARTIAL])
def test_partial_rotary_rotates_the_first_dims_only(head_dim, rotary_dim, dtype):
    gen = torch.Generator().manual_seed(head_dim + rotary_dim)
    rows_per_position, positions = 3, 9
    cos, sin = _tables(positions, rotary_dim, dtype, start=40, row_pad=8)
    x, buf = _layout(positions * rows_per_position, 4, head_dim, dtype, "kv_half", gen)
    before = buf.clone()
    expected = rope_reference(x, cos, sin, rows_per_position=rows_per_position, rotary_dim=rotary_dim)
    assert torch.equal(expected[..., rotary_dim:], x[..., rotary_dim:])  # the reference passes them through
    assert rope_(x, cos, sin, rows_per_position=rows_per_position, rotary_dim=rotary_dim) is x
    assert torch.equal(x, expected)
    assert torch.equal(buf[:, 0, :, rotary_dim:], before[:, 0, :, rotary_dim:])  # pass-through dims untouched
    assert torch.equal(buf[:, 1], before[:, 1])  # and so is V
    assert not torch.equal(x[..., :rotary_dim], before[:, 0, :, :rotary_dim])


def test_partial_rotary_matches_the_adapter():
    # The llama adapter's apply_rope (what prefill uses) and the kernel rotate a partial-rotary head alike.
    from engine.adapters.llama import apply_rope

    gen = torch.Generator().manual_seed(2)
    positions, batch, heads, dim, rotary = 5, 2, 3, 80, 32
    cos, sin = _tables(positions, rotary, torch.float32)
    x = torch.randn(positions * batch, heads, dim, generator=gen)
    # the adapter takes (B, T, H, D) with (B, T, R) tables; rows here are slot-major, sequences inside
    want = apply_rope(x.view(positions, batch, heads, dim).transpose(0, 1),
                      cos[None].expand(batch, -1, -1), sin[None].expand(batch, -1, -1))
    rope_(x, cos, sin, rows_per_position=batch, rotary_dim=rotary)
    assert torch.allclose(x.view(positions, batch, heads, dim).transpose(0, 1), want, atol=1e-6)


# -- the launcher ---------------------------------------------------------------------------------------------
def _good(rows=6, heads=2, dim=32, positions=3, dtype=torch.float32):
    cos, sin = _tables(positions, dim, dtype)
    return torch.randn(rows, heads, dim).to(dtype), cos.contiguous(), sin.contiguous()


def test_launcher_rejects_odd_or_oversized_rotary_dims():
    for dim, rotary in ((33, None), (64, 33), (64, 66), (64, 0)):
        x = torch.randn(3, 2, dim)
        cos = sin = torch.ones(3, rotary or dim)
        with pytest.raises(AssertionError, match=f"head dim {dim}"):
            rope_(x, cos, sin, rows_per_position=1, rotary_dim=rotary)
    x = torch.randn(3, 2, 64)
    with pytest.raises(AssertionError):  # tables as wide as the head, rotary dim 32
        rope_(x, torch.ones(3, 64), torch.ones(3, 64), rows_per_position=1, rotary_dim=32)


def test_launcher_rejects_a_strided_head_dim():
    x = torch.randn(6, 32, 2).transpose(1, 2)  # (6, 2, 32) with stride 1 on the heads, not the dim
    _, cos, sin = _good()
    with pytest.raises(AssertionError, match="head dim must be contiguous"):
        rope_(x, cos, sin, rows_per_position=2)


@pytest.mark.parametrize("rows,rows_per_position", [(5, 2), (7, 2), (6, 1), (6, 3)])
def test_launcher_rejects_rows_that_are_not_positions_times_rows_per_position(rows, rows_per_position):
    x, cos, sin = _good(rows=rows)  # 3 positions
    with pytest.raises(AssertionError):
        rope_(x, cos, sin, rows_per_position=rows_per_position)


def test_launcher_rejects_mismatched_tables():
    x, cos, sin = _good()
    for bad_cos, bad_sin in ((cos[:2], sin), (cos, sin[:, :16]), (cos[:, :16], sin[:, :16]),
                             (cos, sin.double()), (cos.t().contiguous().t(), sin)):
        with pytest.raises(AssertionError):
            rope_(x.clone(), bad_cos, bad_sin, rows_per_position=2)


def test_zero_rows_is_a_no_op():
    x = torch.empty(0, 4, 64)
    cos = sin = torch.empty(0, 64)
    assert rope_(x, cos, sin, rows_per_position=3) is x
    assert rope_(x, cos, sin, rows_per_position=1).shape == (0, 4, 64)
