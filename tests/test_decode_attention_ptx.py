"""Compile the decode-attention kernel for sm_90 without a GPU and check the L2 prefetch in its PTX.

The compile runs in a child process without TRITON_INTERPRET: once the interpreter has run a kernel in
this process (test_decode_attention.py), triton's code generator is left patched and cannot compile.
"""

import importlib.util
import json
import os
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

_PREFETCH = "cp.async.bulk.prefetch.L2"

# (group, PREFETCH, DISTANCE) per variant name
VARIANTS = {"mha_prefetch_d2": (1, True, 2), "gqa4_prefetch_d1": (4, True, 1), "gqa4_no_prefetch": (4, False, 1)}

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.decode_attention import _kernel, _merge_kernel

signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "seq_lens_ptr": "*i32", "o_ptr": "*fp32",
             "lse_ptr": "*fp32", "qk_scale": "fp32"}
for name in _kernel.arg_names[len(signature):]:
    if name.isupper():
        break
    signature[name] = "i32"
# What the JIT specialises for a real cache: pointers and strides 16-aligned.
attrs = {(_kernel.arg_names.index(n),): [["tt.divisibility", 16]]
         for n in signature if n.endswith("_ptr") or n.startswith("stride")}
ptx = {}
for name, (group, prefetch, distance) in json.loads(sys.argv[2]).items():
    constexprs = dict(GROUP=group, BLOCK_M=16, HEAD_DIM=128, BLOCK_N=64, SPLIT=True,
                      PREFETCH=prefetch, DISTANCE=distance, DOT_FP32=False)
    source = ASTSource(fn=_kernel, signature={**signature, **{n: "constexpr" for n in constexprs}},
                       constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    ptx[name] = compiled.asm["ptx"]
merge_signature = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"}
for name in _merge_kernel.arg_names[3:]:
    merge_signature[name] = "constexpr" if name.isupper() else "i32"
merge = ASTSource(fn=_merge_kernel, signature=merge_signature, constexprs=dict(HEAD_DIM=128, BLOCK_S=64, CHUNK=32))
ptx["merge"] = triton.compile(merge, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
print(json.dumps(ptx))
"""


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(_ROOT), json.dumps(VARIANTS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["mha_prefetch_d2", "gqa4_prefetch_d1"])
def test_prefetch_path_emits_bulk_l2_prefetch(ptx, variant):
    text = ptx[variant]
    assert _PREFETCH in text
    assert "%tid.x" in text  # the predicate that lets one thread issue it
    assert "cp.async.cg.shared.global" in text  # 16-byte tile loads, pipelined through shared memory


def test_no_prefetch_path_has_no_bulk_prefetch(ptx):
    assert _PREFETCH not in ptx["gqa4_no_prefetch"]
    assert "cp.async.cg.shared.global" in ptx["gqa4_no_prefetch"]  # tiles still pipelined through shared memory


def test_merge_kernel_compiles_for_sm90(ptx):
    assert ".entry _merge_kernel" in ptx["merge"]
