"""RoPE tables inside a CUDA-graph capture (engine/adapters/base.py: rotary_tables): transformers' position-dependent
RoPE (Phi-3's LongRoPE, dynamic NTK) re-chooses its frequencies on every call, in some versions with a host branch
that a capture cannot hold. Under capture the tables come from the frequencies the eager calls before it set, and
equal the eager ones; outside a capture every call goes through transformers' own update."""

import pytest
import torch

from engine import load_model
from engine.adapters import base


@pytest.mark.parametrize("preset", ["tiny-phi3", "tiny-llama", "tiny-gemma3"])
def test_captured_tables_equal_the_eager_ones_and_skip_the_update(preset, monkeypatch):
    model = load_model(f"synthetic:{preset}", device="cpu", dtype="float32")
    adapter = model.adapter
    hidden = torch.zeros(2, 1, model.spec.hidden_size)
    positions = torch.tensor([[30], [11]])
    eager = adapter.rope(hidden, positions)  # sets the frequencies for this run, as a prefill does
    monkeypatch.setattr(base, "_capturing", lambda h: True)
    captured = adapter.rope(hidden, positions)
    assert len(captured) == len(eager) == model.spec.num_layers
    for (cos_c, sin_c), (cos_e, sin_e) in zip(captured, eager):
        assert torch.equal(cos_c, cos_e) and torch.equal(sin_c, sin_e)
    if preset == "tiny-phi3":
        # the update would put the short factors back; under capture the frequencies are used as they are
        rotary = adapter.decoder.rotary_emb
        rotary.inv_freq.mul_(2.0)
        doubled = adapter.rope(hidden, positions)[0][0]
        assert not torch.equal(doubled, eager[0][0])
        monkeypatch.setattr(base, "_capturing", lambda h: False)
        assert torch.equal(adapter.rope(hidden, positions)[0][0], eager[0][0])  # eager: transformers' update again


def test_a_compiled_step_never_asks_the_capture_state(monkeypatch):
    """torch.compile cannot trace torch.cuda.is_current_stream_capturing (a graph break fails the fullgraph compile
    of the decode step, as it did on an H200): while compiling, the question is not asked."""
    import types

    def untraceable():
        raise AssertionError("asked while compiling")

    cuda_hidden = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", untraceable)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert base._capturing(cuda_hidden) is False
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with pytest.raises(AssertionError, match="asked while compiling"):
        base._capturing(cuda_hidden)
