"""What the peers run: OPT models, the run shapes their READMEs and scripts use, and what their schedules move.

KVPR's code and FlexGen load OPT only, in fp16, with 2048 learned positions. The shapes:
- kvpr:    B32 P256 N32, KVPR's README (its latency test, its throughput test, and its FlexGen baseline).
- flexgen: B32 P512 N32, FlexGen's README workload (512 prompt tokens, 32 generated), at KVPR's batch.
- suite:   this repository's B8 P2048 N64 with the prompt cut to 1984 tokens: P2048 + N64 = 2112 positions do not
           fit OPT's 2048 (FlexGen's OptConfig and KV Lab's preset alike), so no one can run the uncut shape.

`h2d_bytes_per_step` is what each peer's decode step copies host-to-device, read from its code paths (which
tensors its loaders copy, their shapes and dtypes), as the mean over the decode steps; it is computed, not counted.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from engine.presets import PRESETS

OPT_POSITIONS = 2048  # learned positions of every OPT model (FlexGen's OptConfig.max_seq_len)
FP16_BYTES = 2


@dataclass(frozen=True)
class OptModel:
    """One OPT model's shape, as FlexGen's `get_opt_config` and the public config.json give it."""

    name: str  # "opt-6.7b"
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    vocab_size: int = 50272

    @property
    def hf_name(self) -> str:
        return f"facebook/{self.name}"

    @property
    def kvlab_source(self) -> str:
        return f"synthetic:{self.name}"

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, all layers, fp16."""
        return 2 * self.num_layers * self.hidden_size * FP16_BYTES

    @property
    def weight_bytes(self) -> int:
        """fp16 weights: attention and MLP of every layer, token and position embeddings (lm_head is tied)."""
        h = self.hidden_size
        per_layer = 4 * h * h + 2 * h * self.ffn_dim
        return (self.num_layers * per_layer + (self.vocab_size + OPT_POSITIONS + 2) * h) * FP16_BYTES

    def config_json(self) -> dict:
        """The public config.json of facebook/<name> (the fields transformers' OPTConfig reads)."""
        return {"architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_function": "relu",
                "activation_dropout": 0.0, "attention_dropout": 0.0, "dropout": 0.1, "layerdrop": 0.0,
                "hidden_size": self.hidden_size, "ffn_dim": self.ffn_dim, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "word_embed_proj_dim": self.hidden_size,
                "max_position_embeddings": OPT_POSITIONS, "vocab_size": self.vocab_size,
                "do_layer_norm_before": True, "enable_bias": True, "layer_norm_elementwise_affine": True,
                "init_std": 0.02, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "prefix": "</s>",
                "torch_dtype": "float16", "use_cache": True}


def opt_model(name: str) -> OptModel:
    """'opt-6.7b' and 'opt-13b' from KV Lab's presets (the same public configs); 'opt-125m' for CPU smoke runs."""
    if name == "opt-125m":
        return OptModel(name=name, hidden_size=768, num_layers=12, num_heads=12, ffn_dim=3072)
    preset = PRESETS.get(name)
    if preset is None or preset["model_type"] != "opt":
        raise ValueError(f"unknown OPT model {name!r}: the peers run opt-6.7b, opt-13b (or opt-125m on a CPU)")
    return OptModel(name=name, hidden_size=preset["hidden_size"], num_layers=preset["num_hidden_layers"],
                    num_heads=preset["num_attention_heads"], ffn_dim=preset["ffn_dim"],
                    vocab_size=preset["vocab_size"])


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    why: str

    @property
    def label(self) -> str:
        return f"B{self.batch} P{self.prompt_tokens} N{self.new_tokens}"

    @property
    def max_tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def decode_steps(self) -> range:
        """Decode step i attends P + i positions; step 0 is the prefill (every peer counts it apart)."""
        return range(1, self.new_tokens)


SHAPES = {
    "kvpr": Shape("kvpr", 32, 256, 32, "KVPR's README: its latency and throughput tests and its FlexGen baseline"),
    "flexgen": Shape("flexgen", 32, 512, 32, "FlexGen's README workload (512 prompt tokens, 32 generated) at "
                                             "KVPR's batch of 32"),
    "suite": Shape("suite", 8, 1984, 64, "the suite's B8 P2048 N64 with the prompt cut to 1984: P2048 + N64 = 2112 "
                                         "positions exceed OPT's 2048"),
}
QUICK_SHAPE = Shape("quick", 2, 24, 6, "a smoke run on a machine without a GPU")


def h2d_bytes_per_step(engine: str, model: OptModel, shape: Shape, *, recompute_tokens: int = 0) -> int:
    """Host-to-device bytes of one decode step, mean over the run's decode steps, from each peer's code:

    - flexgen (K/V on the CPU, attention on the GPU): SelfAttention.load_cache copies K and V of positions
      [0, P + i) of every layer (path 0).
    - flexgen-cpu (attention on the CPU, --cpu-cache-compute): K/V never move; mha_gen sends q, k, v of the new
      token to the CPU and each layer's attention output comes back in fp32 (`.cuda().half()`).
    - kvpr (KVPR's FlexGen path, --kv-partial): K and V of [l, P + i) and the activations of [0, l) of every layer.
    - kvpr-hf (KVPR's transformers path, OffloadedStaticCache): layer 0 lives on the GPU; every other layer's
      prefetch copies its whole static K/V buffer, slots [l, P + N), and the activations of [0, l).
    """
    b, h, layers = shape.batch, model.hidden_size, model.num_layers
    p, n, l = shape.prompt_tokens, shape.new_tokens, recompute_tokens
    kv_slot = 2 * b * h * FP16_BYTES  # K and V of one position of every sequence, one layer
    act_slot = b * h * FP16_BYTES
    steps = shape.decode_steps
    if engine == "flexgen":
        per_step = [layers * kv_slot * (p + i) for i in steps]
    elif engine == "flexgen-cpu":
        per_step = [layers * b * h * 4 for _ in steps]
    elif engine == "kvpr":
        per_step = [layers * (kv_slot * (p + i - l) + act_slot * l) for i in steps]
    elif engine == "kvpr-hf":
        per_step = [(layers - 1) * (kv_slot * (p + n - l) + act_slot * l) for _ in steps]
    else:
        raise ValueError(f"no schedule for {engine!r}")
    return int(statistics.fmean(per_step)) if per_step else 0


def full_kv_bytes_per_step(model: OptModel, shape: Shape) -> int:
    """Every layer's K/V of every attended position, mean over the decode steps: what shipping all K/V moves."""
    return h2d_bytes_per_step("flexgen", model, shape)
