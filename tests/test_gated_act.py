"""act(gate) * up over [gate | up] (interpreter) against transformers' arithmetic: SiLU and GELU-tanh, awkward row
counts and widths, every dtype; strided rows; the output fully written."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.decode_attention import _interpreting  # noqa: E402
from kernels.gated_act import gated_act, gated_act_reference  # noqa: E402
from test_norm_kernels import poisoned, ulps  # noqa: E402,F401 - the fixture is used by name

pytestmark = [pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 before triton is imported"),
              # numpy's exp overflows to inf for very negative gates (-> 0 output, as on the GPU): expected
              pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
SHAPES = [(1, 11008), (3, 2304), (54, 1000), (97, 96), (2, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows,width", SHAPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_act_matches_transformers_arithmetic(rows, width, dtype, act, poisoned):
    gen = torch.Generator().manual_seed(rows * width)
    gate_up = (torch.randn(rows, 2 * width, generator=gen) * 3).to(dtype)
    out = gated_act(gate_up, act=act)
    ref = gated_act_reference(gate_up, act=act)
    assert out.shape == (rows, width) and out.dtype == dtype and not out.isnan().any()
    if dtype == torch.float32:  # against float64: GELU's tanh form in fp32 (torch's) cancels where tanh nears -1
        exact = gated_act_reference(gate_up.double(), act=act)
        torch.testing.assert_close(out.double(), exact, rtol=4e-6, atol=1e-7)
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    else:
        # act(gate) rounds once, the product once: an activation one ulp off (another exp) may cost two. Where
        # GELU underflows (gate < -4) torch's 0.5 * x * (1 + tanh) cancels to ~1e-7 absolute: ulps mean nothing.
        d = ulps(out, ref)
        up = gate_up[:, width:].double().abs()
        tiny = (out.double() - ref.double()).abs() <= 1e-6 * (1 + up)
        assert bool(((d <= 2) | tiny).all()), int(d[~tiny].max())
        if out.numel() >= 256:  # a fraction of 6 values says nothing
            assert (d == 0).float().mean() >= (0.97 if act == "silu" else 0.9), (d == 0).float().mean()


def test_gated_act_matches_the_llama_mlp_module():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=160)).to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.no_grad():
        gate_up = torch.cat((mlp.gate_proj(x), mlp.up_proj(x)), dim=-1)
        want = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    d = ulps(gated_act(gate_up, act="silu"), want)
    assert int(d.max()) <= 2 and (d == 0).float().mean() >= 0.97


def test_gated_act_takes_3d_inputs_and_strided_rows():
    buf = torch.randn(4, 3, 2 * 50)
    gate_up = buf[:, :2]  # (4, 2, 100): rows of stride 300 inside (4, 3, 100), not collapsible
    with pytest.raises(AssertionError, match="collapse"):
        gated_act(gate_up)
    rows = buf.view(12, 100)[::3]  # (4, 100) with row stride 300
    torch.testing.assert_close(gated_act(rows), gated_act_reference(rows), rtol=2e-6, atol=1e-6)
    x = torch.randn(2, 1, 2 * 33)
    assert gated_act(x).shape == (2, 1, 33)


def test_gelu_tanh_saturates_cleanly():
    gate = torch.tensor([-100.0, -20.0, -1e-4, 0.0, 1e-4, 20.0, 100.0])
    gate_up = torch.cat((gate, torch.ones_like(gate)))[None]
    out = gated_act(gate_up, act="gelu_tanh")
    torch.testing.assert_close(out, gated_act_reference(gate_up, act="gelu_tanh"), rtol=1e-6, atol=1e-7)


def test_launcher_refuses_bad_inputs():
    with pytest.raises(AssertionError):
        gated_act(torch.randn(2, 7))
    with pytest.raises(AssertionError):
        gated_act(torch.randn(2, 8), act="relu")
    with pytest.raises(AssertionError):
        gated_act(torch.randn(8, 2).t())
    assert gated_act(torch.empty(0, 8)).shape == (0, 4)
