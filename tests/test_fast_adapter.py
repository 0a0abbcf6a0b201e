"""engine.fast: the fused adapter against the plain one on every tiny preset with a fast adapter (Llama family, Phi-3,
Gemma 2/3; fp32): prefill and decode
logits, generated tokens, each piece; its weights are views of the model's own (no new memory, transformers' forward
unchanged); the norm hand-over between calls happens in a decode step and falls back when calls come otherwise."""

import copy
import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from engine import TINY_PRESETS, GenerationSettings, Generator, load_model  # noqa: E402
from engine.decode import forward  # noqa: E402
from engine.decode.kv_cache import KVCache  # noqa: E402
from engine.errors import InvalidSettingsError  # noqa: E402
from engine.fast import FusedLlamaAdapter, fuse, why_not_fused  # noqa: E402
from engine.fast import llama as fast_llama  # noqa: E402
from engine.fast.plan import GemmChoice, GemmPlan  # noqa: E402
from engine.fast.weights import storage_bytes  # noqa: E402
from engine.hf_reference import rel_err  # noqa: E402
from kernels.decode_attention import _interpreting  # noqa: E402

FAST_PRESETS = [name for name in TINY_PRESETS if name != "tiny-opt"]
needs_interpreter = pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 before triton is imported")


@pytest.fixture(scope="module")
def models(one_thread):
    return {name: load_model(f"synthetic:{name}", device="cpu", dtype="float32") for name in FAST_PRESETS}


def _run(adapter, spec, *, lens=(7, 5, 2), steps=3, seed=0):
    """Logits of a prefill over mixed lengths and `steps` greedy decode steps on the engine's GPU-style cache."""
    gen = torch.Generator().manual_seed(seed)
    batch, width = len(lens), max(lens)
    ids = torch.randint(3, spec.vocab_size, (batch, width), generator=gen)
    cache = KVCache(spec, batch=batch, max_tokens=width + steps + 1, dtype=torch.float32, device=torch.device("cpu"))
    logits = [forward.prefill(adapter, cache, ids, list(lens))]
    pos, nxt = torch.tensor(lens), logits[0].argmax(-1)
    for _ in range(steps):
        logits.append(forward.decode_step(adapter, cache, nxt, pos, kv_len=cache.max_tokens))
        nxt, pos = logits[-1].argmax(-1), pos + 1
    return logits, cache


@pytest.mark.parametrize("preset", FAST_PRESETS)
@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_fused_logits_equal_the_plain_adapters(models, preset, kernels):
    model = models[preset]
    plain_logits, plain_cache = _run(model.adapter, model.spec)
    fast = fuse(model.adapter, kernels=kernels)
    assert isinstance(fast, FusedLlamaAdapter) and fast.family == model.spec.family
    fast_logits, fast_cache = _run(fast, model.spec)
    limit = 0.0 if kernels == "torch" else 1e-5  # torch pieces: the same ops on the same memory
    for step, (mine, ref) in enumerate(zip(fast_logits, plain_logits)):
        assert rel_err(mine, ref) <= limit, f"step {step}: {rel_err(mine, ref):.2e}"
    torch.testing.assert_close(fast_cache.k, plain_cache.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_cache.v, plain_cache.v, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_fused_prefill_over_token_slices(models, monkeypatch):
    # Slices of 4 tokens: each token is its own batch row with its own RoPE row (the long-prompt path).
    model = models["tiny-qwen3"]
    plain, _ = _run(model.adapter, model.spec, steps=1)
    monkeypatch.setattr(forward, "PREFILL_SLICE_TOKENS", 4)
    fast, _ = _run(fuse(model.adapter, kernels="triton"), model.spec, steps=1)
    for mine, ref in zip(fast, plain):
        assert rel_err(mine, ref) <= 1e-5


@pytest.mark.parametrize("preset", ["tiny-llama3", "tiny-qwen2", "tiny-gemma3", "tiny-phi3"])
def test_generated_tokens_are_the_plain_adapters(models, preset):
    model = models[preset]
    prompts = [[5, 9, 11, 3, 40], [7, 7, 7], [100, 3, 8, 9, 20, 31, 2]]
    settings = GenerationSettings(max_new_tokens=6, ignore_eos=True)
    plain = Generator(model).generate(prompts, settings, keep_logits=True)
    fast = Generator(dataclasses.replace(model, adapter=fuse(model.adapter))).generate(prompts, settings,
                                                                                       keep_logits=True)
    assert fast.token_ids == plain.token_ids
    assert all(torch.equal(a, b) for a, b in zip(fast.logits, plain.logits))


@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-gemma3", "tiny-phi3"])
def test_each_piece_matches_the_plain_piece(models, preset, kernels):
    model = models[preset]
    plain, spec = model.adapter, model.spec
    fast = fuse(plain, kernels=kernels)
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 2, spec.hidden_size, generator=gen)
    positions = torch.tensor([[3, 4], [0, 1], [9, 10]])
    rope = plain.rope(hidden, positions)[1]
    tol = dict(rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        x = plain.attn_input(1, hidden)
        torch.testing.assert_close(fast.attn_input(1, hidden), x, **tol)
        for mine, ref in zip(fast.project_qkv(1, x, rope), plain.project_qkv(1, x, rope)):
            torch.testing.assert_close(mine, ref, **tol)
        attn = torch.randn(3, 2, spec.num_heads * spec.head_dim, generator=gen)
        torch.testing.assert_close(fast.attn_output(1, attn, hidden), plain.attn_output(1, attn, hidden), **tol)
        torch.testing.assert_close(fast.mlp_block(1, hidden), plain.mlp_block(1, hidden), **tol)
        torch.testing.assert_close(fast.logits(hidden), plain.logits(hidden), **tol)
        k = torch.randn(4, spec.num_kv_heads, spec.head_dim, generator=gen)
        k2 = k.clone()
        fast.finish_k_(1, k)
        plain.finish_k_(1, k2)
        assert torch.equal(k, k2)
    weight, bias = fast.kv_weight(1)
    ref_weight, ref_bias = plain.kv_weight(1)
    assert torch.equal(weight, ref_weight) and bias is None and ref_bias is None
    assert weight.untyped_storage().data_ptr() == fast.qkv[1].weight.untyped_storage().data_ptr()  # a view


def test_weights_are_views_of_the_fused_tensors_and_memory_is_unchanged():
    model = load_model("synthetic:tiny-qwen2", device="cpu", dtype="float32")  # its own copy: fusing mutates it
    hf = model.hf_model
    params_before = sum(p.numel() for p in hf.parameters())
    bytes_before = storage_bytes(list(hf.parameters()))
    ids = torch.randint(3, model.spec.vocab_size, (2, 9))
    with torch.no_grad():
        hf_before = hf(ids).logits
    fast = fuse(model.adapter)
    assert sum(p.numel() for p in hf.parameters()) == params_before
    assert storage_bytes(list(hf.parameters())) == bytes_before  # the separate weights' storages were given back
    for layer, block in enumerate(model.adapter.layers):
        attn, mlp = block.self_attn, block.mlp
        qkv, gate_up = fast.qkv[layer], fast.gate_up[layer]
        size = qkv.weight.element_size()
        assert attn.q_proj.weight.data_ptr() == qkv.weight.data_ptr()
        assert attn.k_proj.weight.data_ptr() == qkv.weight.data_ptr() + attn.q_proj.weight.numel() * size
        assert attn.v_proj.weight.data_ptr() == attn.k_proj.weight.data_ptr() + attn.k_proj.weight.numel() * size
        assert attn.q_proj.bias.data_ptr() == qkv.bias.data_ptr()  # qwen2's qkv bias is fused too
        assert mlp.gate_proj.weight.data_ptr() == gate_up.weight.data_ptr()
        assert mlp.up_proj.weight.data_ptr() == gate_up.weight.data_ptr() + mlp.gate_proj.weight.numel() * size
        kv, kv_bias = fast.kv_weight(layer)
        assert kv.data_ptr() == attn.k_proj.weight.data_ptr() and kv.shape[0] == 2 * attn.k_proj.weight.shape[0]
        assert kv_bias.data_ptr() == attn.k_proj.bias.data_ptr()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, hf_before)  # transformers' own forward, on the same memory
    again = fuse(model.adapter)  # idempotent: the weights already lie back to back
    assert again.qkv[0].weight.data_ptr() == fast.qkv[0].weight.data_ptr()
    assert fuse(fast) is fast
    # A deep copy (the bench's fp32 reference) gets independent weights, not a second fused set.
    clone = copy.deepcopy(hf)
    assert storage_bytes(list(clone.parameters())) <= bytes_before


def test_a_decode_step_hands_each_norm_over_once(models, monkeypatch):
    model = models["tiny-llama"]
    fast = fuse(model.adapter)
    calls = []
    real = fast_llama.add_norm
    monkeypatch.setattr(fast_llama, "add_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = model.spec
    cache = KVCache(spec, batch=2, max_tokens=8, dtype=torch.float32, device=torch.device("cpu"))
    forward.decode_step(fast, cache, torch.tensor([5, 6]), torch.tensor([0, 3]), kv_len=8)
    # layer 0's input norm, then per layer the post-attention add + norm and (but for the last) the next layer's
    # add + norm, then the final norm: no norm runs twice
    assert len(calls) == 1 + spec.num_layers + (spec.num_layers - 1) + 1
    assert fast._hand_over.hidden is None  # nothing is held between steps


@pytest.mark.parametrize("kernels", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("preset", ["tiny-llama3", "tiny-qwen3", "tiny-gemma3", "tiny-phi3"])
def test_the_rope_launch_writes_the_new_kv_into_a_gpu_cache(models, preset, kernels, monkeypatch):
    """With the Triton kernels the new token's K/V reach the GPU cache from the RoPE launch (no scatter of their
    own), at each sequence's position and nowhere else; the torch pieces and the plain adapter store them through
    write_new. Both caches end equal to the plain adapter's, slot for slot."""
    model = models[preset]
    spec, fast = model.spec, fuse(model.adapter, kernels=kernels)
    writes = []
    real = KVCache.write_at
    monkeypatch.setattr(KVCache, "write_at", lambda self, *a, **k: writes.append(a[0]) or real(self, *a, **k))
    caches = []
    for adapter in (model.adapter, fast):
        cache = KVCache(spec, batch=3, max_tokens=9, dtype=torch.float32, device=torch.device("cpu"))
        sentinel = 7.0  # slots no step writes keep it
        cache.k.fill_(sentinel), cache.v.fill_(sentinel)
        writes.clear()
        positions = torch.tensor([4, 0, 8])
        forward.decode_step(adapter, cache, torch.tensor([5, 6, 9]), positions, kv_len=9)
        caches.append((cache, list(writes)))
    (plain, plain_writes), (mine, mine_writes) = caches
    assert plain_writes == list(range(spec.num_layers))
    assert mine_writes == ([] if kernels == "triton" else list(range(spec.num_layers)))
    torch.testing.assert_close(mine.k, plain.k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.v, plain.v, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(3, 9, dtype=torch.bool)
    untouched[torch.arange(3), positions] = False
    assert bool((mine.k[:, untouched.nonzero()[:, 0], :, untouched.nonzero()[:, 1]] == 7.0).all())


def test_calls_out_of_order_get_the_unfused_computation(models):
    model = models["tiny-llama3"]
    plain, fast = model.adapter, fuse(model.adapter)
    spec = model.spec
    hidden = torch.randn(2, 1, spec.hidden_size)
    attn = torch.randn(2, 1, spec.num_heads * spec.head_dim)
    with torch.inference_mode():
        mid = fast.attn_output(0, attn, hidden)
        other = mid + 1.0  # not the tensor the hand-over was made for
        assert torch.equal(fast.mlp_block(0, other), plain.mlp_block(0, other))
        out = fast.mlp_block(0, mid)  # the hand-over was dropped by the call above: computed afresh
        assert torch.equal(out, plain.mlp_block(0, mid))
        # the offload runtime's halves: the output copied into a static buffer before the next call
        static = torch.empty_like(out)
        static.copy_(out)
        assert torch.equal(fast.attn_input(1, static), plain.attn_input(1, static))
        # the hand-over for layer 1 must not serve layer 2, nor the right layer under the wrong kind
        out = fast.mlp_block(0, fast.attn_output(0, attn, hidden))
        assert torch.equal(fast.attn_input(2, out), plain.attn_input(2, out))
        mid = fast.attn_output(1, attn, hidden)
        assert torch.equal(fast.attn_input(1, mid), plain.attn_input(1, mid))


def test_fuse_leaves_other_families_alone():
    opt = load_model("synthetic:tiny-opt", device="cpu", dtype="float32")
    assert fuse(opt.adapter) is opt.adapter
    assert "opt" in why_not_fused(opt.adapter)
    assert why_not_fused(load_model("synthetic:tiny-llama", device="cpu", dtype="float32").adapter) is None


def test_a_tensor_parallel_part_is_not_fused(models):
    """A rank's part all-reduces inside its row-parallel projections' forward: the fast adapter's own GEMMs would
    skip that, so such a part keeps its plain adapter, asked for or by default."""
    model = copy.deepcopy(models["tiny-llama"])

    class RowParallelLinear(torch.nn.Linear):  # stands in for engine/parallel/modules.py's (known by its name)
        pass

    attn = model.adapter.layers[0].self_attn
    attn.o_proj = RowParallelLinear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
    assert "tensor-parallel" in why_not_fused(model.adapter)
    assert fuse(model.adapter) is model.adapter


def test_the_default_is_the_fast_adapter_on_a_gpu_and_the_plain_one_on_the_cpu(models):
    assert GenerationSettings().fused == "auto"
    model = models["tiny-llama"]
    gen = Generator(model)
    assert gen._adapter(GenerationSettings()) is model.adapter and "plain adapter on the CPU" in gen.fused_why
    assert isinstance(gen._adapter(GenerationSettings(fused=True)), FusedLlamaAdapter)  # asked for: fused anyway
    assert gen._adapter(GenerationSettings(fused=False)) is model.adapter and gen.fused_why == "off"
    on_gpu = Generator(dataclasses.replace(model, device=torch.device("cuda")))  # how "auto" reads the device
    assert isinstance(on_gpu._adapter(GenerationSettings()), FusedLlamaAdapter) and "fast adapter" in on_gpu.fused_why
    assert on_gpu._adapter(GenerationSettings(compile=True)) is model.adapter and "under compile" in on_gpu.fused_why


@pytest.mark.parametrize("value", ["yes", 1, None, "Auto"])
def test_fused_takes_true_false_or_auto(value):
    with pytest.raises(InvalidSettingsError, match="fused must be True, False or 'auto'"):
        GenerationSettings(fused=value)


@needs_interpreter
def test_a_measured_plan_picks_cublas_or_the_skinny_kernel(models, monkeypatch):
    from kernels import skinny_gemm as skinny

    model = models["tiny-llama"]
    spec = model.spec
    qkv_shape = ((spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim, spec.hidden_size)
    plan = GemmPlan(device="test")
    plan.choices[GemmPlan.key(2, *qkv_shape, False)] = GemmChoice(kernel="cublas", config=None, skinny_us=10.0,
                                                                   cublas_us=5.0, weight_bytes=1)
    fast = fuse(model.adapter, kernels="triton", plan=plan)
    launched = []
    real = skinny.skinny_gemm
    monkeypatch.setattr(skinny, "skinny_gemm",
                        lambda x, w, *a, **k: launched.append(tuple(w.shape)) or real(x, w, *a, **k))
    x = torch.randn(2, 1, spec.hidden_size)
    with torch.inference_mode():
        fast.qkv[0](x, policy=fast.policy, plan=plan)  # measured: cuBLAS
        fast.o[0](torch.randn(2, 1, spec.hidden_size), policy=fast.policy, plan=plan)  # unmeasured: skinny
    assert launched == [tuple(fast.o[0].weight.shape)]  # the plan is consulted per call, by rows and shape


def test_plan_round_trips_through_json(tmp_path, monkeypatch):
    from engine.fast import plan as plan_mod

    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    cpu = torch.device("cpu")
    empty = plan_mod.gemm_plan(cpu)
    assert empty.choices == {} and empty.config(8, 4096, 4096, gated=False, device=cpu) is not None
    assert empty.config(64, 4096, 4096, gated=False, device=cpu) is None  # unmeasured and above 16 rows: cuBLAS
    empty.choices[GemmPlan.key(8, 4096, 4096, False)] = plan_mod.GemmChoice(
        kernel="skinny", config={"block_m": 16, "block_n": 64, "block_k": 128, "split_k": 4, "num_warps": 4,
                                 "num_stages": 3}, skinny_us=9.0, cublas_us=29.0, weight_bytes=4096 * 4096 * 2)
    assert plan_mod.save_plan(empty, cpu) is not None
    again = plan_mod.gemm_plan(cpu)
    assert again.config(8, 4096, 4096, gated=False, device=cpu).block_n == 64
    assert again.rows()[0]["winner"] == "skinny" and again.rows()[0]["cublas_gb_s"] > 1000


def test_kernel_policy_refuses_a_bad_weights_ahead_and_fuse_passes_it_on(models):
    from engine.fast.ops import KernelPolicy

    for bad in (-1, True, 2.0, "4"):
        with pytest.raises(ValueError, match="weights_ahead"):
            KernelPolicy(weights_ahead=bad)
    model = load_model("synthetic:tiny-llama", device="cpu", dtype="float32")
    fast = fuse(model.adapter, pdl=True, weights_ahead=4)
    assert fast.policy.pdl and fast.policy.weights_ahead == 4


@needs_interpreter
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-phi3"])
def test_folded_norms_give_the_fused_adapters_tokens(models, name):
    """fold_norm: o_proj and down add the residual and write the rows' sums of squares, gate/up and the next q/k/v
    RMS-norm their input in their prologue; no norm launch between them in a decode step. fp32 under the
    interpreter: the same greedy tokens as the fused adapter without it, logits within rstd's last-bit difference,
    and the hand-overs taken in every decode layer."""
    model = models[name]
    prompts = [[5, 9, 13, 2, 7], [3, 4]]
    settings = GenerationSettings(max_new_tokens=4, ignore_eos=True, cuda_graph=False)
    results, calls = {}, {}
    for fold in (False, True):
        fast = fuse(model.adapter, kernels="triton", fold_norm=fold)
        fast.plan = GemmPlan(device="test")  # no measured plan: the skinny kernel's defaults on every shape
        from kernels import skinny_gemm as sg

        seen = []
        original = sg._launch
        try:
            sg._launch = lambda *a, **k: (seen.append((k.get("residual") is not None, k.get("norm") is not None)),
                                          original(*a, **k))[1]
            results[fold] = Generator(dataclasses.replace(model, adapter=fast)).generate(prompts, settings,
                                                                                        keep_logits=True)
        finally:
            sg._launch = original
        calls[fold] = seen
    assert results[True].token_ids == results[False].token_ids
    for a, b in zip(results[True].logits, results[False].logits):
        assert rel_err(a, b) <= 1e-5
    residual_launches = sum(r for r, _ in calls[True])
    normed_launches = sum(n for _, n in calls[True])
    layers, steps = model.spec.num_layers, 3  # 4 new tokens: the prefill and 3 decode steps
    # a step: o_proj and every down but the last add the residual; gate/up and every q/k/v but the first norm it.
    # The prefill (10 rows: skinny too) norms the q/k/v inputs in attn_input, which needs the normed tensor.
    assert residual_launches == (steps + 1) * (2 * layers - 1)
    assert normed_launches == steps * (2 * layers - 1) + layers
    assert not any(r or n for r, n in calls[False])


def test_fp16_never_folds_its_norms(models):
    """h * w, which the fold hands the next GEMM, can overflow fp16's range where the normed h * rstd * w would not:
    fp16 rows keep the norm kernel with fold_norm on, where bf16 and fp32 rows of the same shape fold."""
    model = models["tiny-llama"]
    fast = fuse(model.adapter, kernels="triton", fold_norm=True)
    fast.plan = GemmPlan(device="test")  # the skinny kernel's defaults on every shape: both sides run it
    hidden, width = model.spec.hidden_size, model.spec.num_heads * model.spec.head_dim
    folds = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        attn, residual = torch.zeros(2, 1, width, dtype=dtype), torch.zeros(2, 1, hidden, dtype=dtype)
        folds[dtype] = fast._folds(fast.o[0], attn, residual, fast.gate_up[0], act=fast.act)
    assert folds == {torch.float16: False, torch.bfloat16: True, torch.float32: True}, folds


@needs_interpreter
def test_the_default_fast_adapter_gives_every_placement_the_same_bf16_logits(profile_cache):
    """bf16, the Triton kernels: GPU-resident decoding and offloaded decoding at split 0.5, 0 and 1 give bit-equal
    logits with the default fast adapter (the offloaded layers norm their input with the same kernel and recompute
    from that normed tensor). The folded norms (fold_norm=True) round the resident q/k/v input once where the
    offloaded path rounds it twice, which is why they stay opt-in: asserted here too, so a fold made the default
    fails this test until the offloaded path rounds as it does."""
    from engine.settings import OffloadSettings

    model = load_model("synthetic:tiny-llama", device="cpu", dtype="bfloat16")
    prompts = [[5, 9, 13, 2, 7, 11, 4], [3, 4, 8]]
    placements = {"gpu": OffloadSettings(), **{f"cpu {split}": OffloadSettings(placement="cpu", split=split)
                                               for split in (0.5, 0.0, 1.0)}}
    for fold in (False, True):
        fast = fuse(model.adapter, kernels="triton", fold_norm=fold)
        fast.plan = GemmPlan(device="test")
        generator = Generator(dataclasses.replace(model, adapter=fast))
        runs = {name: generator.generate(prompts, GenerationSettings(max_new_tokens=6, ignore_eos=True,
                                                                     cuda_graph=False, offload=offload),
                                         keep_logits=True)
                for name, offload in placements.items()}
        equal = {name: all(torch.equal(a, b) for a, b in zip(run.logits, runs["gpu"].logits))
                 for name, run in runs.items() if name != "gpu"}
        if fold:
            assert not any(equal.values()), equal
        else:
            assert all(equal.values()), equal
            assert all(run.token_ids == runs["gpu"].token_ids for run in runs.values())


@needs_interpreter
@pytest.mark.parametrize("offload", [dict(placement="cpu", split=0.5), dict(placement="cpu", split=0.0),
                                     dict(placement="hybrid")], ids=["cpu-split0.5", "cpu-split0", "hybrid"])
def test_folded_norms_keep_the_tokens_of_every_placement(models, profile_cache, offload):
    """The offload runtime, its recomputation (which stores the normed input of each layer) and a hybrid cache whose
    sequences cross from resident slots to offloaded ones: with the folds they give the fused adapter's tokens."""
    from engine.settings import OffloadSettings

    model = models["tiny-llama"]
    if offload["placement"] == "hybrid":  # 6 slots per sequence resident, the rest offloaded
        offload = dict(offload, gpu_kv_budget_gib=2 * 6 * model.spec.kv_bytes_per_token / 2**30)
    prompts = [[5, 9, 13, 2, 7, 11, 4], [3, 4, 8]]
    settings = GenerationSettings(max_new_tokens=5, ignore_eos=True, cuda_graph=False,
                                  offload=OffloadSettings(**offload))
    runs = {}
    for fold in (False, True):
        fast = fuse(model.adapter, kernels="triton", fold_norm=fold)
        fast.plan = GemmPlan(device="test")
        generator = Generator(dataclasses.replace(model, adapter=fast))
        runs[fold] = generator.generate(prompts, settings, keep_logits=True)
        if offload["placement"] == "hybrid":  # the budget really cut the sequences: some slots resident, some not
            assert 0 < generator.plan.resident_tokens < len(prompts[0]) + 5, generator.plan
    assert runs[True].token_ids == runs[False].token_ids
    for a, b in zip(runs[True].logits, runs[False].logits):
        assert rel_err(a, b) <= 1e-5
