"""Residual add + RMSNorm (Llama and Gemma styles) and + LayerNorm kernels (interpreter) against their torch
references, which are transformers' own arithmetic: the sum bit for bit, the normed output within one ulp in 16-bit
(nearly all bit for bit) and a few ulps in fp32, over awkward row counts and widths; outputs fully written."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.decode_attention import _interpreting  # noqa: E402
from kernels.layer_norm import add_layer_norm, add_layer_norm_reference  # noqa: E402
from kernels.rms_norm import MAX_HIDDEN, add_rms_norm, add_rms_norm_reference  # noqa: E402

pytestmark = pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 before triton is imported")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
# (rows, hidden): every awkward row count meets a width that is not a power of two.
SHAPES = [(1, 3584), (3, 5120), (54, 2304), (97, 100), (3, 64), (1, 7)]


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the last place between same-dtype float tensors (as integers on the bit patterns)."""
    assert a.dtype == b.dtype
    int_type = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    ia, ib = a.view(int_type).long(), b.view(int_type).long()
    sign = 1 << (8 * a.element_size() - 1)
    # Map the sign-magnitude patterns onto a monotone integer line.
    ia = torch.where(ia < 0, -(ia + sign), ia)
    ib = torch.where(ib < 0, -(ib + sign), ib)
    return (ia - ib).abs()


@pytest.fixture
def poisoned(monkeypatch):
    """Every tensor the launchers allocate starts as NaN: an element the kernel does not write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def _inputs(rows, hidden, dtype, seed, *, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * scale).to(dtype)
    r = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    return x, r, w, b


def _close(out, ref, dtype, *, max_ulps_16=1, min_exact=0.97):
    """16-bit: within max_ulps_16 everywhere and mostly bit-identical; fp32: a few ulps of the row's scale (an
    output near zero after cancellation has no meaningful ulp distance)."""
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=4e-6, atol=4e-6 * float(ref.abs().max()))
        return
    d = ulps(out, ref)
    assert int(d.max()) <= max_ulps_16, f"max {int(d.max())} ulps"
    assert (d == 0).float().mean() >= min_exact, f"only {(d == 0).float().mean():.3f} bit-identical"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_add_rms_norm_matches_transformers_arithmetic(rows, hidden, dtype, unit_offset, poisoned):
    x, r, w, _ = _inputs(rows, hidden, dtype, seed=rows * hidden)
    total, normed = add_rms_norm(x, r, w, eps=1e-5, unit_offset=unit_offset)
    ref_total, ref_normed = add_rms_norm_reference(x, r, w, eps=1e-5, unit_offset=unit_offset)
    assert torch.equal(total, ref_total)  # one rounding of the same fp32 sum
    # Llama rounds twice (the normed value, then its product with the weight): an intermediate one ulp off (the
    # sum of squares in another order) can end two ulps off after a weight above 1. Gemma rounds once.
    _close(normed, ref_normed, dtype, max_ulps_16=1 if unit_offset else 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rms_norm_without_residual_returns_the_input_as_the_sum(dtype, poisoned):
    x, _, w, _ = _inputs(5, 640, dtype, seed=3, scale=40.0)  # large values: the variance in fp32 matters
    total, normed = add_rms_norm(x, None, w, eps=1e-6)
    assert total is x
    _close(normed, add_rms_norm_reference(x, None, w, eps=1e-6)[1], dtype, max_ulps_16=2)


def test_rms_norm_matches_llamas_module_bit_for_bit_in_most_places():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(4096, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(4096))
    x = torch.randn(8, 1, 4096).to(torch.bfloat16)
    r = torch.randn(8, 1, 4096).to(torch.bfloat16)
    total, normed = add_rms_norm(x, r, norm.weight.detach(), eps=1e-5)
    assert total.shape == (8, 1, 4096) and torch.equal(total, r + x)
    _close(normed, norm(r + x).detach(), torch.bfloat16, max_ulps_16=2, min_exact=0.99)


def test_rms_norm_takes_strided_rows_and_leaves_inputs_alone():
    x_buf = torch.randn(6, 2, 96)  # x is every other row of a bigger buffer
    x, r, w = x_buf[:, 0], torch.randn(6, 96), torch.rand(96) + 0.5
    before = x_buf.clone(), r.clone()
    total, normed = add_rms_norm(x, r, w, eps=1e-5)
    ref_total, ref_normed = add_rms_norm_reference(x, r, w, eps=1e-5)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(normed, ref_normed, rtol=2e-6, atol=2e-6)
    assert torch.equal(x_buf, before[0]) and torch.equal(r, before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows,hidden", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_add_layer_norm_matches_torch(rows, hidden, dtype, with_bias, poisoned):
    x, r, w, b = _inputs(rows, hidden, dtype, seed=rows + hidden)
    b = b if with_bias else None
    total, normed = add_layer_norm(x, r, w, b, eps=1e-5)
    ref_total, ref_normed = add_layer_norm_reference(x, r, w, b, eps=1e-5)
    assert torch.equal(total, ref_total)
    _close(normed, ref_normed, dtype)


def test_layer_norm_without_residual_and_with_a_large_mean():
    x = torch.randn(4, 1000) + 100.0  # the centred second pass keeps the variance exact-ish
    w, b = torch.rand(1000), torch.randn(1000)
    total, normed = add_layer_norm(x, None, w, b, eps=1e-5)
    assert total is x
    torch.testing.assert_close(normed, add_layer_norm_reference(x, None, w, b, eps=1e-5)[1], rtol=1e-4, atol=1e-4)


def test_launchers_refuse_bad_inputs():
    x, w = torch.randn(3, 64), torch.ones(64)
    with pytest.raises(AssertionError):
        add_rms_norm(x, None, torch.ones(63), eps=1e-5)  # weight width
    with pytest.raises(AssertionError):
        add_rms_norm(torch.randn(3, MAX_HIDDEN + 1), None, torch.ones(MAX_HIDDEN + 1), eps=1e-5)
    with pytest.raises(AssertionError):
        add_rms_norm(x, None, w.double(), eps=1e-5)  # weight dtype
    with pytest.raises(AssertionError):
        add_rms_norm(x, torch.randn(3, 64).half(), w, eps=1e-5)  # residual dtype
    with pytest.raises(AssertionError, match="contiguous"):
        add_rms_norm(torch.randn(64, 3).t(), None, w, eps=1e-5)
    with pytest.raises(AssertionError, match="collapse"):
        add_rms_norm(torch.randn(4, 6, 64)[:, ::2].transpose(0, 1), None, w, eps=1e-5)
    with pytest.raises(AssertionError):
        add_layer_norm(x, None, w, torch.ones(32), eps=1e-5)
    with pytest.raises(AssertionError):
        add_layer_norm(x, None, None, None, eps=1e-5)


def test_zero_rows_launch_nothing():
    x, w = torch.empty(0, 1, 64), torch.ones(64)
    total, normed = add_rms_norm(x, torch.empty(0, 1, 64), w, eps=1e-5)
    assert total.shape == normed.shape == (0, 1, 64)
    assert add_layer_norm(x, None, w, None, eps=1e-5)[1].shape == (0, 1, 64)
