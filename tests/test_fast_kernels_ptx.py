"""Compile the fast path's kernels for sm_90 without a GPU and check their PTX: 16-byte global loads (cp.async for the
skinny GEMM's tiles), tensor-core instructions (mma.sync at 16 rows, wgmma at 64), the split-K ticket as a gpu-scope
acq_rel atomic behind a barrier with L2-only reads of the partials, 64-bit row offsets, and no local memory.

The compile runs in a child process without TRITON_INTERPRET (see tests/test_decode_attention_ptx.py for why).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
_SPEC = importlib.util.find_spec("triton.backends.nvidia") if importlib.util.find_spec("triton") else None
_BIN = Path(_SPEC.origin).parent / "bin" if _SPEC else None
pytestmark = pytest.mark.skipif(
    _BIN is None or not any(_BIN.glob("ptxas*")),
    reason="triton's CUDA backend or its bundled ptxas is absent; cannot compile for sm_90",
)

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.gated_act import _gated_act_kernel
from kernels.kv_store import _kv_store_kernel
from kernels.layer_norm import _add_layer_norm_kernel
from kernels.rms_norm import _add_rms_norm_kernel
from kernels.rope_qkv import _rope_qkv_kernel
from kernels.skinny_gemm import _skinny_gemm_kernel
from kernels.stream_read import _stream_read_kernel

def build(fn, types, constexprs, *, num_warps=4, num_stages=3):
    defaults = {n: v for n, v in (("PDL", False), ("AHEAD_TILES", 0), ("RESIDUAL", False), ("NORM_IN", False),
                                   ("UNIT_OFFSET", False), ("BLOCK_SSQ", 1)) if n in fn.arg_names}
    constexprs = {**defaults, **constexprs}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    # What the JIT specialises for real tensors: pointers, strides and sizes divisible by 16.
    aligned = [n for n in fn.arg_names if n not in constexprs and (n.endswith("_ptr") or n.startswith("stride")
               or n in ("N", "K", "k_per_split", "up_offset", "split_stride", "num_cols", "width", "num_elements",
                                                      "head_dim", "half_rotary"))]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages)).asm["ptx"]

bf16 = lambda *names: {n: "*bf16" for n in names}
ptx = {}
gemm_types = {**bf16("x_ptr", "w_ptr", "bias_ptr", "y_ptr", "res_ptr", "nw_ptr", "scaled_ptr"), "part_ptr": "*fp32",
              "ticket_ptr": "*i32", "ssq_ptr": "*fp32", "eps": "fp32"}
for name, cx in {"gemm_m16_split": dict(ACT="", GATED=False, SPLIT=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128),
                 "gemm_m16_gated": dict(ACT="silu", GATED=True, SPLIT=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128),
                 "gemm_m64": dict(ACT="", GATED=False, SPLIT=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)}.items():
    ptx[name] = build(_skinny_gemm_kernel, gemm_types, dict(HAS_BIAS=False, EVEN_K=True, DOT_FP32=False, **cx),
                      num_stages=4)
ptx["rms_norm"] = build(_add_rms_norm_kernel, bf16("x_ptr", "res_ptr", "w_ptr", "sum_ptr", "out_ptr") | {"eps": "fp32"},
                        dict(HAS_RESIDUAL=True, UNIT_OFFSET=False, BLOCK=4096), num_warps=8)
ptx["layer_norm"] = build(_add_layer_norm_kernel, bf16("x_ptr", "res_ptr", "w_ptr", "b_ptr", "sum_ptr", "out_ptr")
                          | {"eps": "fp32"}, dict(HAS_RESIDUAL=True, HAS_BIAS=True, BLOCK=4096), num_warps=8)
ptx["gated_act"] = build(_gated_act_kernel, bf16("gu_ptr", "out_ptr"), dict(ACT="silu", BLOCK=1024))
ptx["rope_qkv"] = build(_rope_qkv_kernel, bf16("qkv_ptr", "cos_ptr", "sin_ptr", "qw_ptr", "kw_ptr", "kc_ptr", "vc_ptr")
                        | {"pos_ptr": "*i64", "eps": "fp32"},
                        dict(QK_NORM=True, UNIT_OFFSET=False, STORE=True, BLOCK_H=16, BLOCK_D=128))
ptx["gemm_pdl"] = build(_skinny_gemm_kernel, gemm_types, dict(HAS_BIAS=False, EVEN_K=True, DOT_FP32=False, ACT="",
                        GATED=False, SPLIT=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, PDL=True), num_stages=4)
for name, cx in {"gemm_pdl_ahead": dict(GATED=False, ACT=""), "gemm_pdl_ahead_gated": dict(GATED=True, ACT="silu")}.items():
    ptx[name] = build(_skinny_gemm_kernel, gemm_types, dict(HAS_BIAS=False, EVEN_K=True, DOT_FP32=False, SPLIT=True,
                      BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, PDL=True, AHEAD_TILES=4, **cx), num_stages=4)
ptx["gemm_residual"] = build(_skinny_gemm_kernel, gemm_types, dict(HAS_BIAS=False, EVEN_K=True, DOT_FP32=False, ACT="",
                             GATED=False, SPLIT=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, RESIDUAL=True), num_stages=4)
ptx["gemm_norm_in"] = build(_skinny_gemm_kernel, gemm_types, dict(HAS_BIAS=False, EVEN_K=True, DOT_FP32=False,
                            ACT="silu", GATED=True, SPLIT=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, NORM_IN=True,
                            BLOCK_SSQ=128), num_stages=4)
ptx["rms_norm_pdl"] = build(_add_rms_norm_kernel, bf16("x_ptr", "res_ptr", "w_ptr", "sum_ptr", "out_ptr")
                            | {"eps": "fp32"}, dict(HAS_RESIDUAL=True, UNIT_OFFSET=False, BLOCK=4096, PDL=True),
                            num_warps=8)
ptx["kv_store"] = build(_kv_store_kernel, bf16("k_ptr", "v_ptr", "kc_ptr", "vc_ptr") | {"pos_ptr": "*i64"},
                        dict(BLOCK_H=32, BLOCK_D=128))
ptx["stream_read"] = build(_stream_read_kernel, bf16("src_ptr") | {"out_ptr": "*fp32", "num_elements": "i64"},
                           dict(EVEN=False, BLOCK=4096))
print(json.dumps(ptx))
"""


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(_ROOT)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _count(text: str, pattern: str) -> int:
    return len(re.findall(pattern, text))


@pytest.mark.parametrize("name", ["gemm_m16_split", "gemm_m16_gated", "gemm_m64", "gemm_residual", "gemm_norm_in"])
def test_skinny_gemm_streams_16_byte_tiles_into_tensor_cores(ptx, name):
    text = ptx[name]
    copies = re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+|\d+)", text)
    assert copies and all(int(size, 0) == 16 for size in copies), set(copies)  # every tile load 16 bytes wide
    assert "cp.async.wait_group" in text or "cp.async.wait" in text  # pipelined through shared memory
    if name == "gemm_m64":
        assert "wgmma.mma_async" in text  # Hopper's warpgroup MMA at 64 rows
    else:
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in text
    assert ".local" not in text  # nothing spilled to local memory


@pytest.mark.parametrize("name", ["gemm_m16_split", "gemm_m16_gated"])
def test_split_k_ticket_is_a_released_and_acquired_gpu_atomic(ptx, name):
    text = ptx[name]
    atom = re.search(r"atom\.global\.gpu\.acq_rel\.add\.u32", text)
    assert atom, "the ticket must be an acq_rel atomic at gpu scope"
    # a CTA barrier between the partials' stores and the ticket: every thread's stores are released by it
    before = text[: atom.start()]
    assert before.rfind("bar.sync") > before.rfind("st.global"), "no barrier between the partial stores and the ticket"
    assert "ld.global.cg" in text  # partials read from L2, never a stale L1 line


@pytest.mark.parametrize("name", ["gemm_pdl", "rms_norm_pdl"])
def test_pdl_waits_for_the_previous_grid_before_touching_memory(ptx, name):
    text = ptx[name]
    wait = text.find("griddepcontrol.wait")
    assert wait >= 0 and text.find("griddepcontrol.launch_dependents") > wait
    first_access = min(i for i in (text.find("ld.global"), text.find("st.global"), text.find("cp.async"),
                                   text.find("atom.global")) if i >= 0)
    assert wait < first_access  # nothing read or written before the predecessor's writes are visible


@pytest.mark.parametrize("name,weights", [("gemm_pdl_ahead", 1), ("gemm_pdl_ahead_gated", 2)])
def test_weights_ahead_prefetch_the_weight_rows_before_the_wait_and_touch_nothing_else(ptx, name, weights):
    text = ptx[name]
    wait = text.find("griddepcontrol.wait")
    prefetches = [m.start() for m in re.finditer(r"cp\.async\.bulk\.prefetch\.L2\.global", text)]
    # one request site per weight (the gated GEMM's gate rows and up rows), all before the wait: the overlap
    assert wait >= 0 and len(prefetches) == weights and max(prefetches) < wait
    before = text[:wait]
    # nothing read or written before the wait: no load, store, atomic or pipeline copy besides the prefetch
    for access in (r"ld\.global", r"st\.global", r"atom\.global", r"cp\.async\.cg"):
        assert not re.search(access, before), access


def test_the_folded_norm_computes_rstd_once_and_the_residual_epilogue_writes_its_sums(ptx):
    norm_in, residual, plain = ptx["gemm_norm_in"], ptx["gemm_residual"], ptx["gemm_m16_gated"]
    assert "sqrt.rn.f32" in norm_in and "sqrt" not in plain  # the epilogue's rstd, correctly rounded
    # the main loop is the plain kernel's: the same asynchronous tile copies and tensor-core work, no per-tile norm
    # (a version that normed x tiles in the loop left their loads out of the pipeline and ran 0.6 ms a step slower)
    for op in (r"cp\.async\.cg", r"mma\.sync"):
        assert _count(norm_in, op) == _count(plain, op) > 0, op
    assert ".local" not in norm_in
    # the residual epilogue stores the sum, h * w and the sums of squares where the plain one stores the output
    assert _count(residual, r"st\.global") > _count(ptx["gemm_m16_split"], r"st\.global")


def test_kernels_without_pdl_have_no_grid_dependency_control(ptx):
    for name in ("gemm_m16_split", "rms_norm", "gated_act", "rope_qkv"):
        assert "griddepcontrol" not in ptx[name], name
        assert "prefetch.L2" not in ptx[name], name


def test_no_split_gemm_has_no_ticket(ptx):
    assert "atom.global" not in ptx["gemm_m64"]


@pytest.mark.parametrize("name,width", [("rms_norm", "v4"), ("layer_norm", "v4"), ("gated_act", "v4"),
                                        ("stream_read", "v4"), ("kv_store", "v4")])
def test_memory_bound_kernels_load_16_bytes_per_thread(ptx, name, width):
    text = ptx[name]
    loads = re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.(v[248])\.b32", text)
    assert loads and set(loads) == {width}, (name, set(loads))
    assert ".local" not in text


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "gated_act", "rope_qkv", "stream_read", "gemm_m16_split",
                                  "kv_store"])
def test_row_offsets_are_64_bit(ptx, name):
    # row * stride (or the block walk) computed in 64 bits: a widening or 64-bit multiply, never a 32-bit one feeding
    # an address alone
    assert _count(ptx[name], r"mul\.wide\.[su]32|mul\.lo\.s64|mad\.wide\.[su]32") >= 1


def test_rope_writes_the_cache_with_64_bit_positions_and_16_byte_rows(ptx):
    text = ptx["rope_qkv"]
    assert "ld.global.b64" in text  # positions read as int64
    stores = re.findall(r"st\.global(?:\.[a-z0-9]+)*", text)
    assert len(stores) >= 3 and set(stores) == {"st.global.v4.b32"}, set(stores)  # q/k in place, K and V to the cache
    assert _count(text, r"ld\.global\.v4\.b32") >= 4  # the head rows, their partners, cos, sin
    assert ".local" not in text
