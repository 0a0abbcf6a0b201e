"""RoPE of q and k inside the fused qkv row (interpreter) against transformers' arithmetic: bit for bit in every
dtype without a q/k norm (partial rotary, odd half widths, head dims not powers of two, tables shared by the batch),
within an ulp or two with Qwen3's q/k norm; V and the rest of the buffer untouched; the cache write lands at each
sequence's position and nowhere else."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.decode_attention import _interpreting  # noqa: E402
from kernels.rope_qkv import rope_qkv_, rope_qkv_reference  # noqa: E402
from test_norm_kernels import ulps  # noqa: E402

pytestmark = pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 before triton is imported")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
# (B, T, Hq, Hkv, D, R): full and partial rotary, R/2 not a power of two, D not a power of two, GQA and MHA.
SHAPES = [(1, 1, 32, 32, 128, 128), (3, 5, 8, 2, 64, 64), (54, 1, 4, 1, 96, 64), (97, 1, 2, 2, 80, 80),
          (2, 3, 5, 1, 128, 48), (1, 2, 3, 3, 16, 2)]


def tables(batch, num_tokens, rotary, dtype, *, shared=False, seed=0):
    """transformers' cos/sin (B or 1, T, R) at random positions: cat(freqs, freqs), cast to the model's dtype."""
    gen = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    rows = 1 if shared else batch
    positions = torch.randint(0, 4000, (rows, 1), generator=gen) + torch.arange(num_tokens)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qkv(batch, num_tokens, hq, hkv, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, num_tokens, (hq + 2 * hkv) * dim, generator=gen) * 2).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["B{}-T{}-Hq{}-Hkv{}-D{}-R{}".format(*s) for s in SHAPES])
def test_rope_qkv_is_bit_identical_to_transformers(shape, dtype):
    batch, num_tokens, hq, hkv, dim, rotary = shape
    qkv = _qkv(batch, num_tokens, hq, hkv, dim, dtype, seed=sum(shape))
    cos, sin = tables(batch, num_tokens, rotary, dtype, shared=batch % 2 == 0, seed=batch)
    heads = dict(num_heads=hq, num_kv_heads=hkv, head_dim=dim)
    q_ref, k_ref, v_ref = rope_qkv_reference(qkv, cos, sin, **heads)
    assert rope_qkv_(qkv, cos, sin, **heads) is qkv
    q, k, v = qkv.unflatten(-1, (hq + 2 * hkv, dim)).split((hq, hkv, hkv), dim=2)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_rope_qkv_matches_the_llama_adapter_pieces():
    from engine.adapters.llama import apply_rope

    qkv = _qkv(4, 3, 4, 2, 32, torch.bfloat16, seed=5)
    cos, sin = tables(4, 3, 32, torch.bfloat16)
    q, k, _ = (t.clone() for t in qkv.unflatten(-1, (8, 32)).split((4, 2, 2), dim=2))
    rope_qkv_(qkv, cos, sin, num_heads=4, num_kv_heads=2, head_dim=32)
    assert torch.equal(qkv[..., :128].unflatten(-1, (4, 32)), apply_rope(q, cos, sin))
    assert torch.equal(qkv[..., 128:192].unflatten(-1, (2, 32)), apply_rope(k, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["qwen3", "gemma3"])
def test_rope_qkv_with_a_qk_norm(dtype, unit_offset):
    batch, num_tokens, hq, hkv, dim = 3, 4, 4, 2, 128
    qkv = _qkv(batch, num_tokens, hq, hkv, dim, dtype, seed=11)
    gen = torch.Generator().manual_seed(2)
    q_norm, k_norm = ((1 + 0.2 * torch.randn(dim, generator=gen)).to(dtype) for _ in range(2))
    cos, sin = tables(batch, num_tokens, dim, dtype)
    heads = dict(num_heads=hq, num_kv_heads=hkv, head_dim=dim, q_norm=q_norm, k_norm=k_norm, eps=1e-6,
                 unit_offset=unit_offset)
    q_ref, k_ref, v_ref = rope_qkv_reference(qkv, cos, sin, **heads)
    rope_qkv_(qkv, cos, sin, **heads)
    q, k, v = qkv.unflatten(-1, (hq + 2 * hkv, dim)).split((hq, hkv, hkv), dim=2)
    assert torch.equal(v, v_ref)
    for got, want in ((q, q_ref), (k, k_ref)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # the norm's sum of squares in another order: its roundings may land an ulp away, then the rotation's
            d = ulps(got, want)
            near_zero = (got.float() - want.float()).abs() <= 2e-2 * want.float().abs().max()
            assert bool(((d <= 4) | near_zero).all()) and (d == 0).float().mean() >= 0.9


def test_rope_qkv_matches_the_qwen3_adapter():
    from engine import load_model

    model = load_model("synthetic:tiny-qwen3", device="cpu", dtype="float32")
    adapter, spec = model.adapter, model.spec
    attn = adapter.layers[1].self_attn
    x = torch.randn(2, 3, spec.hidden_size)
    pos = torch.tensor([[4, 5, 6], [0, 1, 2]])
    rope = adapter.rope(x, pos)[1]
    with torch.no_grad():
        q_ref, k_ref, v_ref = adapter.project_qkv(1, x, rope)
        qkv = torch.cat((attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), dim=-1)
    rope_qkv_(qkv, *rope, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
              q_norm=attn.q_norm.weight.detach(), k_norm=attn.k_norm.weight.detach(), eps=attn.q_norm.variance_epsilon)
    q, k, v = qkv.unflatten(-1, (-1, spec.head_dim)).split((spec.num_heads, spec.num_kv_heads, spec.num_kv_heads), 2)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(v, v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("hq,hkv,dim,rotary", [(4, 2, 64, 64), (3, 3, 80, 32), (8, 1, 128, 128)])
def test_rope_qkv_writes_k_and_v_at_each_position(hq, hkv, dim, rotary, dtype):
    batch, slots = 5, 13
    qkv = _qkv(batch, 1, hq, hkv, dim, dtype, seed=hq + dim)
    cos, sin = tables(batch, 1, rotary, dtype)
    positions = torch.tensor([0, 12, 5, 5, 7])
    sentinel = -1234.0
    # (L, B, Hkv, S, D) caches, one layer's view given, as the engine's KVCache holds them
    k_cache = torch.full((2, batch, hkv, slots, dim), sentinel, dtype=dtype)
    v_cache = torch.full_like(k_cache, sentinel)
    heads = dict(num_heads=hq, num_kv_heads=hkv, head_dim=dim)
    q_ref, k_ref, v_ref = rope_qkv_reference(qkv, cos, sin, **heads)
    rope_qkv_(qkv, cos, sin, **heads, k_cache=k_cache[1], v_cache=v_cache[1], positions=positions)
    q = qkv.unflatten(-1, (hq + 2 * hkv, dim))[:, :, :hq]
    assert torch.equal(q, q_ref)
    rows = torch.arange(batch)
    assert torch.equal(k_cache[1, rows, :, positions], k_ref[:, 0])
    assert torch.equal(v_cache[1, rows, :, positions], v_ref[:, 0])
    written = torch.zeros_like(k_cache, dtype=torch.bool)
    written[1, rows, :, positions] = True
    assert bool((k_cache[~written] == sentinel).all()) and bool((v_cache[~written] == sentinel).all())


def test_launcher_refuses_bad_inputs():
    qkv = torch.randn(2, 1, 8 * 16)
    cos, sin = tables(2, 1, 16, torch.float32)
    heads = dict(num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(AssertionError):
        rope_qkv_(qkv, cos, sin, num_heads=4, num_kv_heads=1, head_dim=16)  # width
    with pytest.raises(AssertionError):
        rope_qkv_(qkv, *tables(2, 1, 18, torch.float32), **heads)  # R > D
    with pytest.raises(AssertionError):
        rope_qkv_(qkv, cos[..., :15], sin[..., :15], **heads)  # odd R
    with pytest.raises(AssertionError):
        rope_qkv_(qkv, cos, sin.double(), **heads)
    with pytest.raises(AssertionError):
        rope_qkv_(qkv, cos, sin, **heads, q_norm=torch.ones(16))  # q_norm without k_norm
    cache = torch.zeros(2, 2, 4, 16)
    with pytest.raises(AssertionError):
        rope_qkv_(qkv, cos, sin, **heads, k_cache=cache, v_cache=cache)  # no positions
    with pytest.raises(AssertionError):  # more than one token with a cache
        rope_qkv_(torch.randn(2, 2, 128), *tables(2, 2, 16, torch.float32), **heads, k_cache=cache, v_cache=cache,
                  positions=torch.zeros(2, dtype=torch.long))


# -- the one-launch K/V store (kernels/kv_store.py) ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("batch,heads,dim", [(1, 1, 128), (5, 3, 80), (54, 8, 64), (97, 2, 16)])
def test_store_kv_writes_each_sequence_at_its_position_only(batch, heads, dim, dtype):
    from kernels.kv_store import store_kv_, store_kv_reference

    slots = 11
    gen = torch.Generator().manual_seed(batch + heads)
    # k and v as views into a fused [q | k | v] row, as the fast adapter returns them
    qkv = torch.randn(batch, 1, (4 + 2 * heads) * dim, generator=gen).to(dtype)
    k = qkv[..., 4 * dim:(4 + heads) * dim].unflatten(-1, (heads, dim))
    v = qkv[..., (4 + heads) * dim:].unflatten(-1, (heads, dim))
    positions = torch.randint(0, slots, (batch,), generator=gen)
    caches = torch.randn(2, 2, batch, heads, slots, dim, generator=gen).to(dtype)  # (K/V, L, B, Hkv, S, D)
    want = caches.clone()
    store_kv_reference(k, v, want[0, 1], want[1, 1], positions)
    store_kv_(k, v, caches[0, 1], caches[1, 1], positions)
    assert torch.equal(caches, want)  # the written slots, and every other one untouched


def test_store_kv_refuses_bad_inputs():
    from kernels.kv_store import store_kv_

    k = torch.randn(2, 1, 3, 16)
    cache = torch.zeros(2, 3, 5, 16)
    with pytest.raises(AssertionError):
        store_kv_(k, k, cache, cache, torch.zeros(3, dtype=torch.long))
    with pytest.raises(AssertionError):
        store_kv_(k, k, cache.half(), cache.half(), torch.zeros(2, dtype=torch.long))
    with pytest.raises(AssertionError):
        store_kv_(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16), cache, cache, torch.zeros(2, dtype=torch.long))
