"""Compile the decode-attention, merge and RoPE kernels for sm_90 without a GPU and check their PTX: the L2 prefetch
where asked and nowhere else, 64-bit address arithmetic, and shared memory within what the planner estimates.

64-bit: every register loaded from a stride parameter is followed through the PTX; none may feed a 32-bit
integer multiply, shift or add (what `key * stride_kn` in int32 compiles to: it wraps past 2^31 elements), and
some must feed a 64-bit one (mul.wide.s32 or a 64-bit mul/mad), so the check is not vacuous. Strides are compiled
as i32, as the JIT passes any stride below 2^31.

The compile runs in a child process without TRITON_INTERPRET: once the interpreter has run a kernel in
this process (test_decode_attention.py), triton's code generator is left patched and cannot compile.
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

_PREFETCH = "cp.async.bulk.prefetch.L2"

# name -> (dtype, GROUP, HEAD_DIM, BLOCK_N, num_stages, PREFETCH, DISTANCE, SOFTCAP, WINDOW[, MERGE_IN_KERNEL])
VARIANTS = {
    "mha_prefetch_d2": ("bf16", 1, 128, 64, 3, True, 2, False, False),
    "gqa4_prefetch_d1": ("bf16", 4, 128, 64, 3, True, 1, False, False),
    "gqa4_no_prefetch": ("bf16", 4, 128, 64, 3, False, 1, False, False),
    "d80_window_softcap": ("bf16", 8, 80, 64, 3, False, 1, True, True),
    "d80_prefetch": ("bf16", 2, 80, 64, 3, True, 1, False, True),
    # the planner's choices at the widest head dim, and its largest fp32 tile
    "d256_bf16": ("bf16", 4, 256, 32, 3, False, 1, False, False),
    "d256_bf16_big_tiles": ("bf16", 4, 256, 64, 3, False, 1, False, False),
    "d256_fp32": ("fp32", 4, 256, 32, 3, False, 1, False, False),
    "d128_fp32_big_tiles": ("fp32", 4, 128, 128, 2, False, 1, False, False),
    # each row's last program merges the splits itself (merge="in-kernel")
    "gqa4_merge_in_kernel": ("bf16", 4, 128, 64, 3, False, 1, False, True, True),
}

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.decode_attention import _kernel, _merge_kernel, block_d_for
from kernels.rope import _rope_kernel

TARGET = GPUTarget("cuda", 90, 32)


def signature_of(fn, pointers, floats=()):
    # pointers: {name: type}; other lower-case names are i32 scalars (as the JIT passes values below 2^31)
    sig = {n: "constexpr" if n.isupper() else pointers.get(n) or ("fp32" if n in floats else "i32") for n in fn.arg_names}
    # What the JIT specialises for a real cache: pointers and strides 16-aligned.
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig if n.endswith("_ptr") or n.startswith("stride")}
    return sig, attrs


def compile_(fn, pointers, constexprs, floats=(), **options):
    sig, attrs = signature_of(fn, pointers, floats)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=TARGET,
                              options=dict(num_warps=4, **options))
    return {"ptx": compiled.asm["ptx"], "shared": compiled.metadata.shared,
            "params": [n for n in fn.arg_names if not n.isupper()]}


out = {}
for name, (dtype, group, head_dim, block_n, stages, prefetch, distance, softcap, window, *merge) in json.loads(sys.argv[2]).items():
    pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "seq_lens_ptr": "*i32",
                "o_ptr": "*fp32", "lse_ptr": "*fp32", "ticket_ptr": "*i32", "final_ptr": f"*{dtype}"}
    constexprs = dict(GROUP=group, BLOCK_M=16, HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), BLOCK_N=block_n,
                      SPLIT=True, PREFETCH=prefetch, DISTANCE=distance, DOT_FP32=dtype == "fp32", SOFTCAP=softcap,
                      WINDOW=window, MERGE_IN_KERNEL=bool(merge and merge[0]))
    out[name] = compile_(_kernel, pointers, constexprs, floats=("qk_scale", "softcap_log2"), num_stages=stages)
out["merge"] = compile_(_merge_kernel, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
                        dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_S=64, CHUNK=32))
for dtype in ("bf16", "fp16"):
    out[f"rope_{dtype}"] = compile_(_rope_kernel, {"x_ptr": f"*{dtype}", "cos_ptr": f"*{dtype}", "sin_ptr": f"*{dtype}"},
                                    dict(HALF=40, BLOCK_HALF=64, BLOCK_R=4, BLOCK_H=8, ROUND_BF16=dtype == "bf16",
                                         ROUND_FP16=dtype == "fp16"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(_ROOT), json.dumps(VARIANTS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stride_arithmetic(ptx: str, params: list[str]) -> tuple[list[str], list[str]]:
    """-> (32-bit integer multiplies/shifts/adds fed by a stride parameter, 64-bit multiplies fed by one).

    A register is tainted when it is loaded from a parameter named stride_* or computed from a tainted one
    (to a fixed point, for loops)."""
    loaded, insts = {}, []
    for line in ptx.splitlines():
        line = line.strip()
        load = re.match(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]", line)
        if load:
            loaded[load.group(1)] = params[int(load.group(2))] if int(load.group(2)) < len(params) else ""
        inst = re.match(r"([a-z][\w.]*)\s+(%\w+)\s*,\s*(.*);", line)
        if inst:
            insts.append((inst.group(1), inst.group(2), re.findall(r"%\w+", inst.group(3)), line))
    assert any(name.startswith("stride") for name in loaded.values()), "no stride parameter found in the PTX"
    tainted = {reg for reg, name in loaded.items() if name.startswith("stride")}
    grew = True
    while grew:
        grew = False
        for _, dst, srcs, _ in insts:
            if dst not in tainted and any(s in tainted for s in srcs):
                tainted.add(dst)
                grew = True
    narrow = [line for op, dst, srcs, line in insts if re.fullmatch(r"%r\d+", dst)
              and re.match(r"(mul|mad|shl|add|sub)", op) and any(s in tainted for s in srcs)]
    wide = [line for op, dst, srcs, line in insts if re.fullmatch(r"%rd\d+", dst)
            and re.match(r"(mul\.wide\.s32|mul\.lo\.s64|mad\.lo\.s64|mad\.wide\.s32)", op) and any(s in tainted for s in srcs)]
    return narrow, wide


@pytest.mark.parametrize("variant", ["mha_prefetch_d2", "gqa4_prefetch_d1", "d80_prefetch"])
def test_prefetch_path_emits_bulk_l2_prefetch(compiled, variant):
    text = compiled[variant]["ptx"]
    assert _PREFETCH in text
    assert "%tid.x" in text  # the predicate that lets one thread issue it
    assert "cp.async.cg.shared.global" in text  # 16-byte tile loads, pipelined through shared memory


@pytest.mark.parametrize("variant", ["gqa4_no_prefetch", "d80_window_softcap", "d256_bf16"])
def test_no_prefetch_path_has_no_bulk_prefetch(compiled, variant):
    assert _PREFETCH not in compiled[variant]["ptx"]
    assert "cp.async.cg.shared.global" in compiled[variant]["ptx"]  # tiles still pipelined through shared memory


def test_padded_head_dim_keeps_16_byte_tile_loads(compiled):
    # D=80 in a 128-wide tile: the masks still let each thread copy 16 bytes at a time
    loads = re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", compiled["d80_window_softcap"]["ptx"])
    assert loads and set(loads) == {"0x10"}, set(loads)


@pytest.mark.parametrize("variant", [*VARIANTS, "merge", "rope_bf16", "rope_fp16"])
def test_address_arithmetic_is_64_bit(compiled, variant):
    narrow, wide = stride_arithmetic(compiled[variant]["ptx"], compiled[variant]["params"])
    assert not narrow, f"32-bit integer arithmetic on a stride (wraps past 2^31 elements): {narrow[:5]}"
    assert wide, "no 64-bit multiply of a stride found: the check would pass vacuously"


def test_the_check_catches_a_32_bit_stride_multiply():
    ptx = """
    ld.param.b32 %r1, [k_param_0];
    ld.param.b32 %r2, [k_param_1];
    mul.lo.s32 %r3, %r2, %r1;
    mul.wide.s32 %rd1, %r3, 2;
    """
    narrow, wide = stride_arithmetic(ptx, ["num_keys", "stride_kn"])
    assert narrow == ["mul.lo.s32 %r3, %r2, %r1;"] and wide == ["mul.wide.s32 %rd1, %r3, 2;"]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith(("d256", "d128_fp32"))])
def test_shared_memory_within_the_planner_estimate(compiled, variant):
    from kernels.decode_attention import HOPPER_SHARED_MEMORY_BYTES, shared_memory_estimate

    dtype, _, head_dim, block_n, stages, *_ = VARIANTS[variant]
    estimate = shared_memory_estimate(block_n, head_dim, stages, element_bytes=4 if dtype == "fp32" else 2)
    assert compiled[variant]["shared"] <= estimate <= HOPPER_SHARED_MEMORY_BYTES, (compiled[variant]["shared"], estimate)


def test_the_in_kernel_merge_takes_an_acq_rel_ticket_and_reads_the_splits_from_l2(compiled):
    ptx = compiled["gqa4_merge_in_kernel"]["ptx"]
    atomics = [line for line in ptx.splitlines() if "atom." in line]
    assert atomics and all("acq_rel" in a and "gpu" in a and "add" in a for a in atomics), atomics
    assert "bar.sync" in ptx  # every thread's partials written before the ticket
    assert re.search(r"ld\.global\.cg", ptx), "the merging program must read other SMs' partials past L1"
    assert "atom." not in compiled["gqa4_no_prefetch"]["ptx"]  # the default merge launches its own kernel


def test_merge_kernel_compiles_for_sm90(compiled):
    assert ".entry _merge_kernel" in compiled["merge"]["ptx"]
    assert ".entry _rope_kernel" in compiled["rope_bf16"]["ptx"]
