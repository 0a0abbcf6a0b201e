"""The engine's own decode loop (engine.Generator): streaming, sampling, EOS, stop strings, lengths,
batch invariance and the preallocated KV cache. CPU, fp32, tiny presets and the embedded demo model.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import engine.decode.forward
import engine.generator
from engine import GenerationSettings, Generator, SamplingSettings, load_model
from engine.decode.kv_cache import KVCache
from engine.sampling import make_generator, sample

GREEDY = GenerationSettings(max_new_tokens=10, ignore_eos=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def demo():
    return load_model("demo", device="cpu", dtype="float32")


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _collect(events):
    """Per-sequence tokens and joined text deltas of a list of StepEvents."""
    batch = len(events[0].token_ids)
    tokens = [[e.token_ids[b] for e in events if e.token_ids[b] is not None] for b in range(batch)]
    texts = ["".join(e.text_deltas[b] for e in events) for b in range(batch)]
    return tokens, texts


# --- streaming -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which, prompts, settings", [
    ("tiny", ["To be, or not", "ab", "caf\u00e9 \u2014 na\u00efve"], dataclasses.replace(GREEDY, max_new_tokens=12)),
    ("tiny", ["To be, or not", "x"], GenerationSettings(max_new_tokens=12, ignore_eos=True,
                                                      sampling=SamplingSettings(temperature=1.0, seed=7))),
    ("demo", ["HAMLET.\nTo be, or not to be", "ROMEO.\n"], GenerationSettings(max_new_tokens=12)),
])
def test_stream_matches_generate(request, which, prompts, settings):
    model = request.getfixturevalue(which)
    generator = Generator(model)
    events = list(generator.stream(prompts, settings))
    result = generator.generate(prompts, settings)

    assert [e.step for e in events] == list(range(len(events)))
    longest_run = max(len(t) for t in result.token_ids)
    assert len(events) == longest_run  # one event per step, and no event after the last sequence finished
    tokens, texts = _collect(events)
    assert tokens == result.token_ids
    assert texts == result.texts
    assert events[-1].finish_reasons == result.finish_reasons
    assert all(f is not None for f in events[-1].finish_reasons) and all(events[-1].finished)
    for b, seq in enumerate(result.token_ids):
        assert len(seq) <= settings.max_new_tokens
        assert result.texts[b] == model.tokenizer.decode([t for t in seq if t not in model.tokenizer.eos_token_ids])

    for e in events:
        assert len(e.token_ids) == len(e.text_deltas) == len(e.finished) == len(e.finish_reasons) == len(prompts)
        assert e.num_active == sum(t is not None for t in e.token_ids)
        assert e.step_ms > 0 and e.elapsed_ms > 0
        for b in range(len(prompts)):
            assert e.finished[b] == (e.finish_reasons[b] is not None)
    for before, after in zip(events, events[1:]):
        assert after.elapsed_ms >= before.elapsed_ms
        for b in range(len(prompts)):
            if before.finished[b]:  # a finished sequence stays finished and gets no more tokens or text
                assert after.finished[b] and after.token_ids[b] is None and after.text_deltas[b] == ""
                assert after.finish_reasons[b] == before.finish_reasons[b]
    # The steps are disjoint stretches of the run: together they cannot take longer than the whole run.
    assert sum(e.step_ms for e in events) <= events[-1].elapsed_ms * 1.001 + 0.01
    assert result.prefill_ms > 0 and len(result.step_ms) == longest_run - 1 and all(ms > 0 for ms in result.step_ms)
    assert result.decode_tokens == sum(len(t) for t in result.token_ids) - len(prompts)


def _script_tokens(monkeypatch, script: list[list[int]]) -> None:
    """Make the decode loop choose `script[b][i]` for sequence b at step i (the model still runs)."""
    calls = [0]

    def scripted_sample(logits, settings, generator):
        i = calls[0]
        calls[0] += 1
        return torch.tensor([seq[min(i, len(seq) - 1)] for seq in script], device=logits.device)

    monkeypatch.setattr(engine.generator, "sample", scripted_sample)


def _byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]  # the synthetic models' byte tokenizer: byte + 3


def test_utf8_split_across_byte_tokens_is_held_back(tiny, monkeypatch):
    """A multi-byte character is not shown as U+FFFD while its bytes are still arriving."""
    script = [_byte_ids("a\u20acb\u00e9!"), _byte_ids("\U0001f600ok") + [3 + 0xFF] + _byte_ids("z")]
    _script_tokens(monkeypatch, script)
    settings = GenerationSettings(max_new_tokens=8, ignore_eos=True)
    events = list(Generator(tiny).stream([[5], [6]], settings))
    assert [e.token_ids[0] for e in events] == script[0][:8]
    assert [e.text_deltas[0] for e in events] == ["a", "", "", "\u20ac", "b", "", "\u00e9", "!"]
    assert [e.text_deltas[1] for e in events] == ["", "", "", "\U0001f600", "o", "k", "", "\ufffdz"]
    _script_tokens(monkeypatch, script)  # the script again, from its start
    assert _collect(events)[1] == Generator(tiny).generate([[5], [6]], settings).texts


def test_partial_stop_prefixes_are_held_until_decided(tiny, monkeypatch):
    """Stop 'abcd' in 'abcabcd': every 'a', 'ab', 'abc' at the end is held; the text before the hit is shown."""
    _script_tokens(monkeypatch, [_byte_ids("abcabcdXY"), _byte_ids("abcaXbcdY")])
    settings = GenerationSettings(max_new_tokens=9, ignore_eos=True, stop_strings=("abcd",))
    events = list(Generator(tiny).stream([[5], [6]], settings))
    assert [e.text_deltas[0] for e in events[:7]] == ["", "", "", "abc", "", "", ""]
    assert events[6].finish_reasons[0] == "stop" and all(e.token_ids[0] is None for e in events[7:])
    assert [e.text_deltas[1] for e in events] == ["", "", "", "abc", "aX", "b", "c", "d", "Y"]
    assert events[-1].finish_reasons == ["stop", "length"]
    _script_tokens(monkeypatch, [_byte_ids("abcabcdXY"), _byte_ids("abcaXbcdY")])
    assert Generator(tiny).generate([[5], [6]], settings).texts == ["abc", "abcaXbcdY"]


# --- sampling --------------------------------------------------------------------------------------------------


def _sampled(tiny, seed, *, temperature=1.0, top_k=0, top_p=1.0, n=16):
    settings = GenerationSettings(max_new_tokens=n, ignore_eos=True,
                                  sampling=SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    return Generator(tiny).generate([[5, 6, 7], [80, 90]], settings).token_ids


def test_same_seed_same_tokens_other_seed_other_tokens(tiny):
    greedy = Generator(tiny).generate([[5, 6, 7], [80, 90]], dataclasses.replace(GREEDY, max_new_tokens=16)).token_ids
    first, again = _sampled(tiny, 1234), _sampled(tiny, 1234)
    assert first == again
    assert first != greedy  # sampling really samples (the tiny model's next-token entropy is ~4.5 nats)
    others = [_sampled(tiny, seed) for seed in (1, 2, 3)]
    assert all(other != first for other in others)
    assert len({str(o) for o in others}) == 3
    assert _sampled(tiny, None) != _sampled(tiny, None)  # no seed: a fresh stream each run
    # A seeded stream is the same whether consumed by stream() or generate().
    settings = GenerationSettings(max_new_tokens=16, ignore_eos=True, sampling=SamplingSettings(temperature=1.0, seed=1234))
    assert _collect(list(Generator(tiny).stream([[5, 6, 7], [80, 90]], settings)))[0] == first


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 1, 1.0), (3.0, 1, 0.9), (0.5, 1, 1.0),
    (1.0, 0, 1e-9),  # nucleus of one token
    (1e-30, 0, 1.0), (1e-40, 0, 1.0), (5e-324, 7, 1.0),  # temperatures so small they underflow float32
])
def test_settings_that_leave_one_token_are_greedy(tiny, temperature, top_k, top_p):
    greedy = Generator(tiny).generate([[5, 6, 7], [80, 90]], dataclasses.replace(GREEDY, max_new_tokens=16)).token_ids
    for seed in (0, 1):
        assert _sampled(tiny, seed, temperature=temperature, top_k=top_k, top_p=top_p) == greedy


def _reference_distribution(row: list[float], temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """The allowed tokens and their probabilities, one row, in plain Python (float64)."""
    vocab = len(row)
    scaled = [x / temperature for x in row]
    order = sorted(range(vocab), key=lambda i: -scaled[i])
    kept = order[:top_k] if 0 < top_k < vocab else order
    top = max(scaled[i] for i in kept)
    weights = {i: math.exp(scaled[i] - top) for i in kept}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    if top_p < 1.0:
        nucleus, before = {}, 0.0
        for i in kept:  # kept is in descending order
            assert abs(before - top_p) > 1e-5, "test data sits on the top-p boundary: pick another seed"
            if before >= top_p:
                break
            nucleus[i] = probs[i]
            before += probs[i]
        total = sum(nucleus.values())
        probs = {i: p / total for i, p in nucleus.items()}
    return probs


@pytest.mark.parametrize("vocab, temperature, top_k, top_p", [
    (7, 1.0, 0, 1.0), (7, 0.7, 3, 1.0), (7, 1.0, 0, 0.8), (7, 2.0, 5, 0.6), (7, 1.0, 7, 1.0), (7, 1.3, 10, 0.9),
    (97, 1.0, 10, 1.0), (97, 1.5, 0, 0.5), (97, 1.0, 40, 0.7), (97, 0.9, 1, 0.3), (97, 2.0, 96, 0.95),
    (384, 1.0, 5, 1.0), (384, 0.8, 0, 0.3), (384, 1.0, 50, 0.5), (384, 1.0, 383, 1.0),
])
def test_sample_masks_match_a_python_reference(vocab, temperature, top_k, top_p):
    rows, draws = 3, 10_000
    gen = torch.Generator().manual_seed(vocab * 1000 + top_k)
    logits = torch.randn(rows, vocab, generator=gen) * 2.0
    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
    drawn = sample(logits.repeat_interleave(draws, dim=0), settings, make_generator(settings, torch.device("cpu")))
    assert drawn.shape == (rows * draws,) and drawn.dtype == torch.int64
    for r in range(rows):
        ref = _reference_distribution(logits[r].tolist(), temperature, top_k, top_p)
        counts = torch.bincount(drawn[r * draws : (r + 1) * draws], minlength=vocab)
        seen = set(torch.nonzero(counts).flatten().tolist())
        assert seen <= set(ref), f"row {r}: drew tokens outside the allowed set: {sorted(seen - set(ref))}"
        likely = {i for i, p in ref.items() if p * draws >= 8}  # expected 8+ draws: missing one has p < e^-8
        assert likely <= seen, f"row {r}: allowed tokens never drawn: {sorted(likely - seen)}"
        if (0 < top_k < vocab or top_p < 1.0) and len(ref) <= 100:  # a cut: every token it keeps shows up
            assert seen == set(ref), f"row {r}: allowed {sorted(ref)}, drawn {sorted(seen)}"
        for i, p in ref.items():  # frequencies agree with the reference (5 sigma)
            freq = counts[i].item() / draws
            assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-3, (r, i, freq, p)


def test_sample_top_k_keeps_ties_and_greedy_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0, -2.0], [5.0, -1.0, 4.0, 4.0, 4.0]])
    assert sample(logits, SamplingSettings(), None).tolist() == [1, 0]
    settings = SamplingSettings(temperature=1.0, top_k=2, seed=0)
    drawn = sample(logits.repeat_interleave(4000, dim=0), settings, make_generator(settings, torch.device("cpu")))
    assert set(drawn[:4000].tolist()) == {1, 2}
    assert set(drawn[4000:].tolist()) == {0, 2, 3, 4}  # the 2nd largest value is tied three ways: all stay


def test_tiny_temperature_on_huge_logits_is_argmax():
    logits = torch.randn(64, 97, generator=torch.Generator().manual_seed(0)) * 1e4
    for temperature in (1e-3, 1e-30, 1e-40, 5e-324):
        settings = SamplingSettings(temperature=temperature, seed=0)
        drawn = sample(logits, settings, make_generator(settings, torch.device("cpu")))
        assert torch.equal(drawn, logits.argmax(-1)), temperature


# --- EOS -------------------------------------------------------------------------------------------------------


def _eos_choice(baseline: list[list[int]]) -> tuple[int, int]:
    """(step, token): sequence 0's token at `step`, new in sequence 0 and absent from every other sequence."""
    for step in range(2, len(baseline[0]) - 2):
        token = baseline[0][step]
        if token not in baseline[0][:step] and all(token not in seq for seq in baseline[1:]):
            return step, token
    raise AssertionError(f"no usable EOS candidate in {baseline}")


def test_eos_stops_one_sequence_while_the_others_continue(tiny, monkeypatch):
    prompts = [[5, 6, 7], [80, 90], [33, 34, 35, 36, 37]]
    generator = Generator(tiny)
    baseline = generator.generate(prompts, GREEDY)
    assert baseline.finish_reasons == ["length"] * 3
    step, token = _eos_choice(baseline.token_ids)
    monkeypatch.setattr(tiny.tokenizer, "eos_token_ids", frozenset({token}))

    settings = dataclasses.replace(GREEDY, ignore_eos=False)
    result = generator.generate(prompts, settings)
    assert result.token_ids[0] == baseline.token_ids[0][: step + 1]  # the EOS token itself is the last one
    assert result.token_ids[1:] == baseline.token_ids[1:]
    assert result.finish_reasons == ["eos", "length", "length"]
    assert result.texts[0] == tiny.tokenizer.decode(baseline.token_ids[0][:step])  # EOS is not text
    assert result.decode_tokens == step + 2 * (GREEDY.max_new_tokens - 1)

    events = list(generator.stream(prompts, settings))
    assert len(events) == GREEDY.max_new_tokens
    assert events[step].token_ids[0] == token and events[step].finish_reasons[0] == "eos"
    assert not any(e.finished[0] for e in events[:step])
    assert all(e.token_ids[0] is None and e.finished[0] for e in events[step + 1 :])
    assert all(e.token_ids[1] is not None for e in events)

    # Alone, the sequence ends the run at its EOS: no step after it.
    alone = list(generator.stream(prompts[:1], settings))
    assert len(alone) == step + 1 and alone[-1].finish_reasons == ["eos"]

    # ignore_eos decodes the full length through the EOS token.
    ignored = generator.generate(prompts, GREEDY)
    assert ignored.token_ids == baseline.token_ids and ignored.finish_reasons == ["length"] * 3


# --- stop strings (demo model, real tokenizer) -----------------------------------------------------------------

DEMO_PROMPTS = ["HAMLET.\nTo be, or not to be", "ROMEO.\nBut soft, what light through yonder window breaks?\n"]


@pytest.fixture(scope="module")
def demo_baseline(demo):
    result = Generator(demo).generate(DEMO_PROMPTS, GenerationSettings(max_new_tokens=24))
    assert result.finish_reasons == ["length", "length"], result
    return result


def _first_token_containing(tokenizer, tokens: list[int], stop: str) -> int:
    return next(j for j in range(len(tokens)) if stop in tokenizer.decode(tokens[: j + 1]))


def test_stop_string_cuts_the_text_and_the_run(demo, demo_baseline):
    tok, base_tokens, base_text = demo.tokenizer, demo_baseline.token_ids[0], demo_baseline.texts[0]
    # A stop string that starts inside a token, some way into the greedy text.
    start = len(tok.decode(base_tokens[:6])) + 2
    stop = base_text[start : start + 5]
    assert base_text.find(stop) == start and stop not in demo_baseline.texts[1], (base_text, stop)
    last = _first_token_containing(tok, base_tokens, stop)
    settings = GenerationSettings(max_new_tokens=24, stop_strings=(stop,))

    result = Generator(demo).generate(DEMO_PROMPTS, settings)
    assert result.texts[0] == base_text[:start]
    assert result.token_ids[0] == base_tokens[: last + 1]
    assert result.finish_reasons == ["stop", "length"]
    assert result.texts[1] == demo_baseline.texts[1] and result.token_ids[1] == demo_baseline.token_ids[1]

    events = list(Generator(demo).stream(DEMO_PROMPTS, settings))
    tokens, texts = _collect(events)
    assert texts == result.texts and tokens == result.token_ids
    assert all(stop not in e.text_deltas[0] for e in events)
    assert events[last].finish_reasons[0] == "stop"
    assert all(e.token_ids[0] is None for e in events[last + 1 :])
    # Every prefix of the streamed text is a prefix of the final text: nothing shown is taken back.
    shown = ""
    for e in events:
        shown += e.text_deltas[0]
        assert result.texts[0].startswith(shown)


def test_the_earliest_of_several_stop_strings_wins(demo, demo_baseline):
    base_text = demo_baseline.texts[0]
    early, late = base_text[3:7], base_text[15:20]
    assert base_text.find(early) == 3 and base_text.find(late) == 15
    for stops in ((late, early), (early, late)):
        result = Generator(demo).generate(DEMO_PROMPTS[:1], GenerationSettings(max_new_tokens=24, stop_strings=stops))
        assert result.texts == [base_text[:3]] and result.finish_reasons == ["stop"]


def test_stop_string_at_the_very_start_gives_empty_text(demo, demo_baseline):
    stop = demo_baseline.texts[1][:2]
    settings = GenerationSettings(max_new_tokens=24, stop_strings=(stop,))
    events = list(Generator(demo).stream(DEMO_PROMPTS[1:], settings))
    last = _first_token_containing(demo.tokenizer, demo_baseline.token_ids[1], stop)
    assert len(events) == last + 1 and events[-1].finish_reasons == ["stop"]
    assert "".join(e.text_deltas[0] for e in events) == ""


def test_partial_stop_string_is_held_back_then_released(demo, demo_baseline):
    tok, base_tokens, base_text = demo.tokenizer, demo_baseline.token_ids[0], demo_baseline.texts[0]
    step = next(s for s in range(8, 20) if tok.decode(base_tokens[: s + 1])[-3:].isalpha())
    text_at_step = tok.decode(base_tokens[: step + 1])
    held = text_at_step[-3:]
    stop = held + "\x00"  # its first three characters end the text at `step`; the whole never occurs
    events = list(Generator(demo).stream(DEMO_PROMPTS[:1], GenerationSettings(max_new_tokens=24, stop_strings=(stop,))))
    shown = ["".join(e.text_deltas[0] for e in events[: n + 1]) for n in range(len(events))]
    assert shown[step] == text_at_step[: -len(held)]  # the possible start of the stop string is not shown yet
    assert shown[step + 1].startswith(text_at_step)  # ... and is released once the text rules the stop out
    assert shown[-1] == base_text and events[-1].finish_reasons == ["length"]
    assert [e.token_ids[0] for e in events] == base_tokens


# --- lengths and batches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_max_new_tokens_is_respected(tiny, max_new_tokens):
    prompts = [[5, 6, 7], [80], [9] * 20]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, ignore_eos=True)
    result = Generator(tiny).generate(prompts, settings)
    assert [len(t) for t in result.token_ids] == [max_new_tokens] * 3
    assert result.finish_reasons == ["length"] * 3
    assert len(result.step_ms) == max_new_tokens - 1 and result.decode_tokens == 3 * (max_new_tokens - 1)
    events = list(Generator(tiny).stream(prompts, settings))
    assert len(events) == max_new_tokens
    assert all(not any(e.finished) for e in events[:-1]) and events[-1].finish_reasons == ["length"] * 3
    # A longer run starts with the same tokens (greedy is a prefix of itself).
    longer = Generator(tiny).generate(prompts, dataclasses.replace(settings, max_new_tokens=max_new_tokens + 3))
    assert [t[:max_new_tokens] for t in longer.token_ids] == result.token_ids


def test_max_new_tokens_bounds_demo_runs_with_eos(demo):
    result = Generator(demo).generate(DEMO_PROMPTS, GenerationSettings(max_new_tokens=5))
    assert all(len(t) <= 5 for t in result.token_ids)
    for seq, reason in zip(result.token_ids, result.finish_reasons):
        assert reason == ("eos" if seq[-1] in demo.tokenizer.eos_token_ids else "length")
        assert reason == "eos" or len(seq) == 5


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt", "tiny-qwen3", "tiny-mistral"])
def test_mixed_length_batch_equals_each_sequence_alone(preset):
    model = load_model(f"synthetic:{preset}", device="cpu", dtype="float32")
    prompts = _prompts(model.spec.vocab_size, [3, 17, 8, 1, 30], seed=11)
    settings = GenerationSettings(max_new_tokens=8, ignore_eos=True)
    generator = Generator(model)
    batch = generator.generate(prompts, settings).token_ids
    alone = [generator.generate([p], settings).token_ids[0] for p in prompts]
    assert batch == alone
    assert generator.generate(prompts[::-1], settings).token_ids == alone[::-1]
    assert len({tuple(t) for t in alone}) == len(alone)  # different prompts, different continuations


# --- the KV cache ----------------------------------------------------------------------------------------------


def test_kv_cache_is_preallocated_once_and_never_concatenated(tiny, monkeypatch):
    made: list[KVCache] = []

    class CountingCache(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ptrs = (self.k.data_ptr(), self.v.data_ptr())
            self.shape = tuple(self.k.shape)
            made.append(self)

    monkeypatch.setattr(engine.generator, "KVCache", CountingCache)

    in_decode = [False]
    decode_calls = [0]
    real_decode_step = engine.decode.forward.decode_step

    def counting_decode_step(*args, **kwargs):
        decode_calls[0] += 1
        in_decode[0] = True
        try:
            return real_decode_step(*args, **kwargs)
        finally:
            in_decode[0] = False

    monkeypatch.setattr(engine.decode.forward, "decode_step", counting_decode_step)

    joined: list[int] = []  # sizes of the tensors torch.cat & co. built during decode steps

    def watch(real):
        def wrapper(*args, **kwargs):
            out = real(*args, **kwargs)
            if in_decode[0]:
                joined.append(out.numel())
            return out
        return wrapper

    for name in ("cat", "concat", "concatenate", "stack"):
        monkeypatch.setattr(torch, name, watch(getattr(torch, name)))

    prompts = _prompts(tiny.spec.vocab_size, [4, 19, 9], seed=2)
    new_tokens = 12
    settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)
    generator = Generator(tiny)
    for run in range(2):
        result = generator.generate(prompts, settings)
        assert len(made) == run + 1, "one KVCache per generate call"
        assert decode_calls[0] == (run + 1) * (new_tokens - 1)
    monkeypatch.undo()

    spec, longest = tiny.spec, 19
    for cache in made:
        layers, batch, heads, slots, dim = cache.shape
        assert (layers, batch, heads, dim) == (spec.num_layers, 3, spec.num_kv_heads, spec.head_dim)
        assert longest + new_tokens - 1 <= slots <= longest + new_tokens  # sized for the whole run up front
        assert tuple(cache.k.shape) == cache.shape and (cache.k.data_ptr(), cache.v.data_ptr()) == cache.ptrs
        # Written in place: the longest sequence's K fills every slot up to its last fed token.
        filled = cache.k[:, 1].abs().amax(dim=(0, 1, 3))
        assert bool((filled[: longest + new_tokens - 1] > 0).all())
    per_layer_k = made[0].k[0].numel()
    assert not [n for n in joined if n >= per_layer_k], f"cache-sized concatenations in decode: {joined}"
    # The run was the ordinary one, not a degenerate path.
    assert result.token_ids == Generator(tiny).generate(prompts, settings).token_ids


def test_out_of_memory_frees_the_run_and_the_next_run_works(monkeypatch):
    """An OOM mid-run becomes OutOfMemoryError, the run's KV cache is really freed, and the next run works."""
    import gc
    import weakref

    import engine.generator as generator_module
    from engine import OutOfMemoryError
    from engine.decode import forward as forward_module

    model = load_model("synthetic:tiny-llama", device="cpu")
    caches = []
    real_cache = generator_module.KVCache

    class TrackedCache(real_cache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(weakref.ref(self.k))

    def failing_decode(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(generator_module, "KVCache", TrackedCache)
    monkeypatch.setattr(forward_module, "decode_step", failing_decode)
    with pytest.raises(OutOfMemoryError, match="lower the batch") as info:
        Generator(model).generate([[5, 6, 7]], GenerationSettings(max_new_tokens=4))
    assert "Tried to allocate" in str(info.value)
    del info
    gc.collect()
    assert caches and all(ref() is None for ref in caches), "the failed run's KV cache is still referenced"
    monkeypatch.undo()
    assert len(Generator(model).generate([[5, 6, 7]], GenerationSettings(max_new_tokens=4)).token_ids[0]) == 4
