"""The skinny GEMM (interpreter) against torch over awkward shapes: rows 1..64, widths not powers of two, K not a
multiple of the tile, split-K 1..5 with the last-program fixup, bias, the gated [gate | up] epilogue, every dtype.
Its error against float64 is no larger than torch's own; every output written; ticket counters back at zero."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.decode_attention import _interpreting  # noqa: E402
from kernels.skinny_gemm import (MAX_ROWS, SkinnyConfig, default_config, skinny_gemm,  # noqa: E402
                                 skinny_gemm_reference, tickets)
from test_norm_kernels import poisoned  # noqa: E402,F401 - the fixture is used by name

pytestmark = [pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 before triton is imported"),
              pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _problem(rows, out_features, in_features, dtype, *, gated=False, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    w = (torch.randn((2 if gated else 1) * out_features, in_features, generator=gen) / in_features ** 0.5).to(dtype)
    b = torch.randn(w.shape[0], generator=gen).to(dtype) if bias else None
    return x, w, b


def _check(x, w, b, act, config=None):
    y = skinny_gemm(x, w, b, act=act, config=config)
    want = skinny_gemm_reference(x, w, b, act=act)
    exact = skinny_gemm_reference(x.double(), w.double(), None if b is None else b.double(), act=act)
    assert y.shape == want.shape and y.dtype == x.dtype and not y.isnan().any()
    if x.dtype == torch.float32:
        assert rel(y, exact) <= 1e-6, rel(y, exact)
    else:  # both round the fp32 sums once (the gated path twice more): no worse than torch's own rounding
        assert rel(y, exact) <= 1.25 * rel(want, exact) + 1e-4, (rel(y, exact), rel(want, exact))
    assert int(tickets(x.device).abs().sum()) == 0  # every column block's last program reset its ticket
    return y


# (rows, out, in, config): default configs and forced splits; K 300 and 200 leave a ragged last tile.
CASES = [
    (1, 2304, 256, None),
    (3, 100, 300, SkinnyConfig(16, 32, 64, 3)),
    (8, 96, 512, SkinnyConfig(16, 32, 128, 2)),
    (16, 64, 200, SkinnyConfig(16, 16, 64, 5)),
    (33, 40, 128, SkinnyConfig(64, 32, 32, 2)),
    (64, 130, 96, SkinnyConfig(64, 64, 32, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows,out_features,in_features,config", CASES,
                         ids=[f"M{m}-N{n}-K{k}-{'default' if c is None else f'split{c.split_k}'}"
                              for m, n, k, c in CASES])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_skinny_gemm_matches_torch(rows, out_features, in_features, config, dtype, bias, poisoned):
    x, w, b = _problem(rows, out_features, in_features, dtype, bias=bias, seed=rows + in_features)
    _check(x, w, b, "", config)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows,out_features,in_features,config", [
    (1, 160, 64, None), (5, 100, 300, SkinnyConfig(16, 32, 64, 3)), (54, 48, 128, SkinnyConfig(64, 16, 32, 2))])
def test_skinny_gemm_gated_epilogue_matches_the_mlp(rows, out_features, in_features, config, act, dtype, poisoned):
    x, w, b = _problem(rows, out_features, in_features, dtype, gated=True, bias=rows == 5, seed=rows)
    y = _check(x, w, b, act, config)
    assert y.shape == (rows, out_features)


def test_split_results_are_deterministic_and_match_no_split():
    x, w, _ = _problem(8, 64, 1024, torch.float32, seed=3)
    whole = skinny_gemm(x, w, config=SkinnyConfig(16, 32, 128, 1))
    for split in (2, 3, 8):
        first = skinny_gemm(x, w, config=SkinnyConfig(16, 32, 128, split))
        assert torch.equal(first, skinny_gemm(x, w, config=SkinnyConfig(16, 32, 128, split)))
        torch.testing.assert_close(first, whole, rtol=1e-5, atol=1e-5)


def test_strided_rows_of_x_and_a_fused_weight_view():
    big = torch.randn(6, 3, 128)
    x = big[:, 1]  # row stride 384
    fused = torch.randn(96 + 32, 128)
    w = fused[96:]  # a view into a fused weight (as the fast adapter's o_proj rows would be)
    torch.testing.assert_close(skinny_gemm(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_default_config_fills_the_chip_and_keeps_x_rereads_small():
    cpu = torch.device("cpu")  # plans for 132 SMs where there is no GPU
    for rows, n, k, gated in [(1, 4096, 4096, False), (8, 4096, 4096, False), (8, 11008, 4096, True),
                              (16, 4096, 11008, False), (64, 4096, 4096, False), (8, 32000, 4096, False),
                              (64, 14336, 4096, True), (1, 2304, 2304, False)]:
        c = default_config(rows, n, k, gated=gated, device=cpu)
        programs = -(-n // c.block_n) * c.split_k
        weight_rows = (2 if gated else 1) * c.block_n
        assert programs >= 132 and rows <= c.block_m, (rows, n, k, c)
        assert rows / weight_rows <= 0.5 and -(-k // c.block_k) // c.split_k >= 4, (rows, n, k, c)


def test_launcher_refuses_bad_inputs():
    x, w = torch.randn(4, 64), torch.randn(32, 64)
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(MAX_ROWS + 1, 64), w)
    with pytest.raises(AssertionError):
        skinny_gemm(x, torch.randn(32, 63))
    with pytest.raises(AssertionError):
        skinny_gemm(x, w.half())
    with pytest.raises(AssertionError):
        skinny_gemm(x, torch.randn(64, 32).t())  # K strided
    with pytest.raises(AssertionError):
        skinny_gemm(x, torch.randn(31, 64), act="silu")  # odd [gate; up]
    with pytest.raises(AssertionError):
        skinny_gemm(x, w, torch.randn(31))
    with pytest.raises(AssertionError):
        skinny_gemm(x, w, act="relu")
    with pytest.raises(AssertionError):
        skinny_gemm(torch.randn(20, 64), w, config=SkinnyConfig(16, 32, 64, 1))  # more rows than the block


@pytest.mark.parametrize("rows,out_features,in_features,gated", [(1, 96, 1000, False), (8, 72, 1100, True),
                                                                  (40, 130, 520, False)])
def test_every_candidate_the_plan_measures_is_legal_and_correct(rows, out_features, in_features, gated):
    """engine/fast/plan.py times each candidate on the GPU and keeps the fastest: each must be a distinct, legal
    launch (rows fit, every split has K tiles) that computes the same GEMM, ragged K and gated epilogue included."""
    from engine.fast.plan import candidate_configs

    device = torch.device("cpu")
    found = candidate_configs(rows, out_features, in_features, gated=gated, device=device)
    assert found[0] == default_config(rows, out_features, in_features, gated=gated, device=device)
    assert len(set(found)) == len(found) >= 5
    assert len({c.split_k for c in found}) >= 3 and len({c.block_n for c in found}) == 2
    x, w, b = _problem(rows, out_features, in_features, torch.bfloat16, gated=gated, bias=True, seed=rows)
    for config in found:
        assert config.block_m >= rows and 1 <= config.split_k <= -(-in_features // config.block_k), config
        _check(x, w, b, "silu" if gated else "", config)


def test_weights_ahead_needs_pdl_and_aligned_rows_and_never_changes_the_result():
    """The weight prefetch runs only where it can overlap something (a PDL launch) and where a bulk prefetch can
    read the rows (16-byte aligned); the interpreter has no PDL, so it runs without it and computes the same."""
    from kernels.skinny_gemm import weights_ahead_refusal

    w = torch.randn(64, 256, dtype=torch.bfloat16)
    assert weights_ahead_refusal(w, 4, pdl=True) is None
    assert "no tiles" in weights_ahead_refusal(w, 0, pdl=True)
    assert "without PDL" in weights_ahead_refusal(w, 4, pdl=False)
    shifted = torch.randn(64 * 256 + 8, dtype=torch.bfloat16)[1:1 + 64 * 256].view(64, 256)  # 2 bytes off
    assert "16-byte aligned" in weights_ahead_refusal(shifted, 4, pdl=True)
    assert "16-byte aligned" in weights_ahead_refusal(torch.randn(64, 260, dtype=torch.bfloat16)[:, :250], 4, pdl=True)
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    cfg = SkinnyConfig(16, 32, 64, 2)
    assert torch.equal(skinny_gemm(x, w, config=cfg, pdl=True, weights_ahead=4), skinny_gemm(x, w, config=cfg))
    with pytest.raises(AssertionError, match="weights_ahead"):
        skinny_gemm(x, w, weights_ahead=-1)


FOLD_CASES = [(1, 96, 200, None), (8, 130, 256, SkinnyConfig(16, 32, 64, 3)), (16, 64, 96, SkinnyConfig(16, 16, 32, 1)),
              (33, 72, 130, None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows,out_features,in_features,config", FOLD_CASES,
                         ids=[f"M{m}-N{n}-K{k}" for m, n, k, _ in FOLD_CASES])
def test_residual_epilogue_is_the_models_add_and_its_sums_of_squares_are_the_rows(rows, out_features, in_features,
                                                                                  config, dtype):
    from kernels.skinny_gemm import skinny_gemm_residual

    x, w, b = _problem(rows, out_features, in_features, dtype, bias=True, seed=rows)
    gen = torch.Generator().manual_seed(9)
    residual = torch.randn(rows, out_features, generator=gen).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(out_features, generator=gen)).to(dtype)
    total, folded = skinny_gemm_residual(x, w, b, residual, norm_weight=norm_w, eps=1e-6, config=config)
    plain = skinny_gemm(x, w, b, config=config)
    assert torch.equal(total, residual + plain)  # the projection rounded, then torch's add: bit for bit
    c = config or default_config(rows, out_features, in_features, gated=False, device=x.device,
                                 dtype_bytes=x.element_size())
    ssq = folded.sum_squares
    assert ssq.shape == (rows, -(-out_features // c.block_n)) and ssq.dtype == torch.float32
    want = total.double().pow(2).sum(-1)
    assert torch.allclose(ssq.double().sum(-1), want, rtol=1e-5), (ssq.sum(-1), want)
    assert torch.equal(folded.scaled, (total.float() * norm_w.float()).to(dtype))  # h * w, rounded once
    assert folded.eps == 1e-6
    assert int(tickets(x.device).abs().sum()) == 0


FOLDED_GEMMS = [(8, 160, 72, SkinnyConfig(16, 32, 64, 2), SkinnyConfig(16, 16, 64, 2)),
                (1, 200, 40, None, None),  # ragged K and N, the default launch shapes
                (13, 96, 130, SkinnyConfig(16, 32, 32, 1), SkinnyConfig(16, 32, 32, 3))]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("act", ["", "silu"], ids=["plain", "gated"])
@pytest.mark.parametrize("rows,hidden,inner,producer,consumer", FOLDED_GEMMS,
                         ids=[f"M{m}-H{h}-I{i}" for m, h, i, _, _ in FOLDED_GEMMS])
def test_a_folded_norm_gives_the_gemm_of_the_normed_rows(dtype, unit_offset, act, rows, hidden, inner, producer,
                                                        consumer):
    """o_proj-like GEMM with the residual epilogue, then a gate/up-like GEMM (with a bias) on the folded norm: the
    same as the one-pass norm kernel's output fed to the plain GEMM (fp32: to rounding; bf16/fp16: no further from
    float64 than that path)."""
    from kernels.rms_norm import add_rms_norm_reference
    from kernels.skinny_gemm import skinny_gemm_residual

    gen = torch.Generator().manual_seed(3 + rows)
    attn = torch.randn(rows, hidden, generator=gen).to(dtype)
    w_o = (torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    residual = (4 * torch.randn(rows, hidden, generator=gen)).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    w_next = (torch.randn((2 if act else 1) * inner, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    b_next = (0.1 * torch.randn((2 if act else 1) * inner, generator=gen)).to(dtype)
    total, folded = skinny_gemm_residual(attn, w_o, None, residual, norm_weight=norm_w, eps=1e-6,
                                         unit_offset=unit_offset, config=producer)
    out = skinny_gemm(folded.scaled, w_next, b_next, act=act, config=consumer, norm=folded)
    _, normed = add_rms_norm_reference(total, None, norm_w, eps=1e-6, unit_offset=unit_offset)
    unfolded = skinny_gemm(normed, w_next, b_next, act=act, config=consumer)
    h = total.double() * torch.rsqrt(total.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    exact_in = h * (1 + norm_w.double()) if unit_offset else h * norm_w.double()
    exact = skinny_gemm_reference(exact_in, w_next.double(), b_next.double(), act=act)
    assert out.shape == unfolded.shape and not out.isnan().any()
    if dtype == torch.float32:
        assert rel(out, unfolded) <= 1e-5, rel(out, unfolded)
    else:
        assert rel(out, exact) <= 1.25 * rel(unfolded, exact) + 1e-3, (rel(out, exact), rel(unfolded, exact))
    assert int(tickets(attn.device).abs().sum()) == 0


def test_folded_norm_inputs_are_checked():
    from kernels.skinny_gemm import FoldedNorm, skinny_gemm_residual

    x, w = torch.randn(4, 64), torch.randn(32, 64)
    with pytest.raises(AssertionError):
        skinny_gemm_residual(x, w, None, torch.randn(4, 31), norm_weight=torch.ones(32), eps=1e-6)  # residual shape
    with pytest.raises(AssertionError):
        skinny_gemm_residual(x, w, None, torch.randn(4, 32), norm_weight=torch.ones(64), eps=1e-6)  # norm not N wide
    with pytest.raises(AssertionError):
        skinny_gemm(x, w, norm=FoldedNorm(x, torch.zeros(3, 2), eps=1e-6))  # sums of other rows
    with pytest.raises(AssertionError, match="scaled rows"):
        skinny_gemm(x, w, norm=FoldedNorm(torch.randn(4, 32), torch.zeros(4, 2), eps=1e-6))  # x is not its rows
