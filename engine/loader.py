"""Load a model: a local Hugging Face directory, a hub id, a synthetic preset, or the embedded demo model.

`load_model(source)` returns a `LoadedModel` (weights on the target device, an adapter, a tokenizer
and the model's shape facts) or raises a `ModelLoadError` whose message names the problem and the fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import gpu_errors, presets
from engine.adapters import DecoderAdapter, ModelSpec, adapter_for, check_supported, check_unquantized
from engine.errors import GpuContextLostError, InvalidSettingsError, ModelLoadError
from engine.memory import check_fits
from engine.tokenizer import Tokenizer, byte_tokenizer, from_hf, unusable_reason

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
SYNTHETIC_PREFIX = "synthetic:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_ALLOWED = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16, torch.float16, torch.float32)}


@dataclass
class LoadedModel:
    source: str
    name: str
    hf_model: torch.nn.Module = field(repr=False)
    adapter: DecoderAdapter = field(repr=False)
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    load_s: float
    notes: list[str] = field(default_factory=list)
    chat_stop_strings: tuple[str, ...] = ()  # where a chat reply ends, besides EOS

    @property
    def spec(self) -> ModelSpec:
        return self.adapter.spec

    def card(self) -> dict:
        """What the UI shows about the model."""
        return {"name": self.name, "source": self.source, "device": str(self.device),
                "dtype": dtype_name(self.dtype), "tokenizer": self.tokenizer.name,
                "load_s": round(self.load_s, 3), "notes": self.notes, **self.spec.as_dict()}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: how dtypes are named to users."""
    return str(dtype).removeprefix("torch.")


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidSettingsError(f"device {device!r} is not a device name: use 'cuda' or 'cpu'.") from exc
    if device.type not in _ALLOWED:
        raise InvalidSettingsError(f"device {device} is not supported: use 'cuda' or 'cpu'.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidSettingsError("device 'cuda' was asked for but no CUDA GPU is visible: use device='cpu'.")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise InvalidSettingsError(f"dtype {dtype!r} is unknown: use one of bfloat16, float16, float32.")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in _ALLOWED[device.type]:
        names = ", ".join(dtype_name(d) for d in _ALLOWED[device.type])
        raise InvalidSettingsError(f"dtype {dtype} is not supported on {device.type}: use one of {names}.")
    return device, dtype


def is_hub_id(source: str) -> bool:
    """'org/name' as the Hugging Face hub spells ids; a path (absolute, relative or home-based) is not one."""
    return not source.startswith(("/", ".", "~")) and _HUB_ID.match(source) is not None


def load_model(source: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               seed: int = 0, max_positions: int | None = None) -> LoadedModel:
    """Load `source`: 'demo', 'synthetic:<preset>', a local directory, or a Hugging Face hub id.

    `max_positions` lengthens a synthetic preset's context (random weights have no trained length; offload
    benches need sequences past e.g. Llama-2's 4096 positions). Trained models keep their own.
    """
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError("No model given: pass a local directory, a hub id (org/name), 'demo' or 'synthetic:<preset>'.")
    source = source.strip()
    if max_positions is not None:
        if isinstance(max_positions, bool) or not isinstance(max_positions, int) or not 1 <= max_positions <= 1 << 22:
            raise InvalidSettingsError(f"max_positions must be a whole number in 1..{1 << 22}, got {max_positions!r}.")
        if not source.startswith(SYNTHETIC_PREFIX):
            raise InvalidSettingsError(f"max_positions only applies to synthetic presets, not {source!r}: a trained "
                                       "model's context is fixed by its weights.")
    device, dtype = resolve_device_dtype(device, dtype)
    if device.type == "cuda" and gpu_errors.lost() is not None:  # this process's GPU context is gone
        raise GpuContextLostError(gpu_errors.lost_message())
    start = time.perf_counter()
    if source.startswith(SYNTHETIC_PREFIX):
        loaded = _load_synthetic(source[len(SYNTHETIC_PREFIX):], device=device, dtype=dtype, seed=seed,
                                 max_positions=max_positions)
    elif source == "demo":
        if not (DEMO_MODEL_DIR / "config.json").exists():
            raise ModelLoadError(f"The embedded demo model is missing from {DEMO_MODEL_DIR}: reinstall KV Lab from a full checkout.")
        loaded = _load_directory(DEMO_MODEL_DIR, device=device, dtype=dtype, source="demo")
        loaded.chat_stop_strings = ("\n\n",)  # a speech of the play ends at a blank line (assets/demo-model)
    else:
        path = Path(source).expanduser()
        if path.exists():
            loaded = _load_directory(path, device=device, dtype=dtype, source=source)
        elif not is_hub_id(source):
            raise ModelLoadError(f"Model path {source!r} does not exist: check the path, or give a hub id like 'org/name'.")
        else:
            loaded = _load_directory(_hub_snapshot(source), device=device, dtype=dtype, source=source)
    loaded.load_s = time.perf_counter() - start
    return loaded


def _load_synthetic(name: str, *, device: torch.device, dtype: torch.dtype, seed: int,
                    max_positions: int | None = None) -> LoadedModel:
    # Built on the meta device and materialised directly on the target: a 13B model's random weights
    # never pass through host memory.
    model, family, config = meta_synthetic(name, dtype=dtype, max_positions=max_positions)
    weight_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    check_fits(weight_bytes, device, what=f"synthetic:{name} in {dtype_name(dtype)}",
               fix="choose a smaller preset (e.g. a tiny-* one), a 16-bit dtype, or a device with more memory.")
    model.to_empty(device=device)
    init_random_weights_(model, std=_init_std(config), seed=seed)
    model.eval()
    tok = byte_tokenizer(bos=presets.SYNTHETIC_BOS_ID, eos=presets.SYNTHETIC_EOS_ID, pad=presets.SYNTHETIC_PAD_ID)
    adapter = adapter_for(model)
    return LoadedModel(source=SYNTHETIC_PREFIX + name, name=name, hf_model=model, adapter=adapter,
                       tokenizer=tok, device=device, dtype=dtype, load_s=0.0,
                       notes=["random weights (synthetic preset): the shapes are real, the text is not",
                              *getattr(adapter, "notes", ())])


def meta_synthetic(name: str, *, dtype: torch.dtype, max_positions: int | None = None):
    """A synthetic preset's transformers model on the meta device (no memory yet) -> (model, family, config);
    ModelLoadError for an unknown preset or an unsupported family."""
    if name not in presets.PRESETS:
        raise ModelLoadError(f"Unknown synthetic preset {name!r}. Presets: {', '.join(presets.PRESETS)}.")
    from transformers import AutoModelForCausalLM

    config = presets.preset_config(name)
    if max_positions is not None:
        config.max_position_embeddings = max_positions
    family = check_supported(config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **_hf_kwargs(family, config.model_type))
    return model, family, config


def _hf_kwargs(family: type[DecoderAdapter], model_type: str) -> dict:
    """What transformers must be told to build the model as its family computes (Gemma 2: eager attention, the only
    one that soft-caps in every transformers 5 release). The reference and the engine share this model."""
    attention = getattr(family, "HF_ATTENTION", {}).get(model_type)
    return {} if attention is None else {"attn_implementation": attention}


def _init_std(config) -> float:
    return float(getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02)


@torch.no_grad()
def init_random_weights_(model: torch.nn.Module, *, std: float, seed: int) -> None:
    """Initialise every parameter and buffer in place on its device (after `to_empty`).

    Buffers hold derived values, not weights: rotary tables are rebuilt from the config by the module's own class
    (every RoPE variant, Gemma 3's per-layer-type tables included), the scaled embedding gets its scale. A buffer of
    any other kind is refused: after `to_empty` it would hold whatever the memory held."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    done: set[int] = set()  # ids of the buffers set here
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__:
            fresh = type(module)(module.config)  # recomputes the tables (a few floats) for this config
            for buf_name, buf in fresh.named_buffers(recurse=False):
                target = getattr(module, buf_name)
                target.copy_(buf)
                done.add(id(target))
            for name, value in vars(fresh).items():  # attention_scaling (per layer type), cached lengths
                if not name.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    setattr(module, name, value)
            continue
        if isinstance(getattr(module, "embed_scale", None), torch.Tensor) and hasattr(module, "scalar_embed_scale"):
            module.embed_scale.fill_(module.scalar_embed_scale)  # Gemma: sqrt(hidden), rounded to the dtype on use
            done.add(id(module.embed_scale))
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            weight.normal_(0.0, std, generator=gen)
        elif isinstance(weight, torch.Tensor) and weight.dim() == 1:  # LayerNorm / RMSNorm scales
            # Gemma's RMSNorms scale by (1 + weight): 0 is their identity, as transformers initialises them.
            weight.fill_(0.0 if _offset_norm(module) else 1.0)
        if isinstance(bias, torch.Tensor):
            if isinstance(module, torch.nn.Linear):
                bias.normal_(0.0, std, generator=gen)  # non-zero so the bias path is exercised
            else:
                bias.zero_()
    unknown = [name for name, buf in model.named_buffers() if id(buf) not in done]
    if unknown:
        raise ModelLoadError(f"The synthetic loader does not know how to initialise the buffers {', '.join(unknown[:3])} "
                             f"of {type(model).__name__}: load this architecture from a checkpoint directory instead.")
    model.tie_weights()


def _offset_norm(module: torch.nn.Module) -> bool:
    """RMSNorms that scale by (1 + weight) (Gemma's); transformers names them after their family."""
    name = type(module).__name__
    return name.startswith("Gemma") and name.endswith("RMSNorm")


def _read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file, not a model directory: give the directory holding config.json.")
    if not config_path.exists():
        raise ModelLoadError(f"Directory {path} has no config.json: a Hugging Face model directory needs "
                             "config.json, *.safetensors weights and tokenizer files.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON ({exc}): restore the file from the model's source.") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} does not hold a JSON object: restore the file from the model's source.")
    return config


def _load_directory(path: Path, *, device: torch.device, dtype: torch.dtype, source: str) -> LoadedModel:
    config = _read_config(path)
    family = check_supported(config.get("model_type"), config.get("architectures"))
    check_unquantized(config.get("quantization_config"), f"The checkpoint in {path}")
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise ModelLoadError(f"Directory {path} has no *.safetensors weights: KV Lab loads safetensors only "
                             "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True)).")
    num_elements, stored_bytes = 0, 0
    for weight_file in weight_files:
        elements, size = _check_safetensors(weight_file)
        num_elements, stored_bytes = num_elements + elements, stored_bytes + size
    fix = "choose a smaller model, a 16-bit dtype, or a device with more memory."
    # transformers reads the weights into host memory first, then they move to the target device.
    check_fits(stored_bytes if device.type == "cuda" else num_elements * dtype.itemsize, torch.device("cpu"),
               what=f"reading the weights of {path.name}", fix=fix)
    if device.type == "cuda":
        check_fits(num_elements * dtype.itemsize, device, what=f"{path.name} in {dtype_name(dtype)}",
                   fix=fix)
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                           low_cpu_mem_usage=True,
                                                           **_hf_kwargs(family, config.get("model_type")))
    except _config_errors() as exc:
        raise ModelLoadError(f"config.json in {path} is not a valid {config.get('model_type')} configuration ({exc}): "
                             "restore the checkpoint's own config.json.") from exc
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"Could not read the model in {path}: {exc}. Re-download or re-convert the weights.") from exc
    except ImportError as exc:  # transformers asks for an optional package some configs need
        raise ModelLoadError(f"transformers could not build the model in {path}: {exc}. KV Lab runs the plain "
                             "architectures it lists; restore the checkpoint's own config.json.") from exc
    missing = [k for k in info.get("missing_keys", []) if "rotary_emb" not in k]
    if missing:
        raise ModelLoadError(f"The weights in {path} lack {len(missing)} tensors (e.g. {missing[0]}): the checkpoint "
                             "is incomplete or belongs to another model. Re-download it.")
    notes = _check_unexpected(model, path, list(info.get("unexpected_keys", [])))
    adapter = adapter_for(model)  # refuses what the engine cannot run, before the weights move to the device
    model = model.to(device).eval()
    tok, tokenizer_note = _load_tokenizer(path, model)
    if tokenizer_note:
        notes.append(tokenizer_note)
    notes.extend(getattr(adapter, "notes", ()))
    name = "demo (Shakespeare)" if source == "demo" else path.name if path.name != "snapshots" else source
    return LoadedModel(source=source, name=name, hf_model=model, adapter=adapter, tokenizer=tok,
                       device=device, dtype=dtype, load_s=0.0, notes=notes)


def _config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config its validators reject (5.24: huggingface_hub's strict dataclasses, which
    derive from no ValueError)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def _check_unexpected(model: torch.nn.Module, path: Path, unexpected: list[str]) -> list[str]:
    """Checkpoint tensors the model built from config.json has no place for. -> notes; raises where they mean the
    config does not describe the weights.

    A tensor of a module the model runs (a q_proj.bias when config.json says there is none) would be dropped and the
    answer silently wrong: refused. More such tensors than the model has: another architecture: refused. The rest
    (layers past num_hidden_layers, modules of another head) are reported."""
    if not unexpected:
        return []
    modules = dict(model.named_modules())
    dropped = [k for k in unexpected if k.rpartition(".")[0] in modules]
    if dropped:
        raise ModelLoadError(
            f"The weights in {path} hold {len(dropped)} tensors that the model described by config.json does not "
            f"use although it has their module (e.g. {dropped[0]}): config.json does not match the checkpoint (a "
            "bias, norm or projection switched off?). Restore the checkpoint's own config.json.")
    expected = len(model.state_dict())
    if len(unexpected) >= expected:
        raise ModelLoadError(
            f"The weights in {path} hold {len(unexpected)} tensors the model described by config.json has no place "
            f"for (e.g. {unexpected[0]}), more than the {expected} it uses: the checkpoint belongs to another "
            "architecture. Restore the checkpoint's own config.json.")
    return [f"{len(unexpected)} tensors in the checkpoint are not used by this model and were ignored (e.g. "
            f"{unexpected[0]})"]


# Files a tokenizer is read from: when one exists, a failure to read it is the user's to fix, not a reason to
# quietly read text as bytes.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _load_tokenizer(path: Path, model: torch.nn.Module) -> tuple[Tokenizer, str | None]:
    """The directory's tokenizer, or bytes with a note saying why. transformers 5 builds a one-token tokenizer for a
    directory without tokenizer files (Qwen2, Qwen3, OPT) instead of raising, so a loaded tokenizer is checked too."""
    from transformers import AutoTokenizer

    files = [name for name in _TOKENIZER_FILES if (path / name).is_file()] + sorted(p.name for p in path.glob("*.tiktoken"))
    vocab = model.config.get_text_config().vocab_size
    try:
        hf_tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - tokenizer classes raise many types
        why = f"failed to load ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    else:
        why = unusable_reason(hf_tok, vocab_size=vocab)
        if why is None:
            return from_hf(hf_tok, model.generation_config), None
    cfg = model.config.get_text_config()
    tok = byte_tokenizer(bos=_first_id(cfg.bos_token_id, 1), eos=_first_id(cfg.eos_token_id, 2),
                         pad=_first_id(cfg.pad_token_id, 0), name="bytes (no usable tokenizer)")
    fallback = ("text is read as UTF-8 bytes (ids 3..258), which this model was not trained on: replies will be "
                "noise, profiling is unaffected")
    if vocab < 3 + 256:
        fallback = f"text cannot be read (the {vocab}-token vocabulary is too small for bytes): pass token ids"
    if files:
        return tok, (f"TOKENIZER NOT LOADED: the tokenizer files in {path.name} ({', '.join(files)}) {why}; {fallback}. "
                     "Fix or replace them with the model's own tokenizer files.")
    return tok, (f"no tokenizer files in {path.name} (tokenizer.json, tokenizer_config.json, ...); {fallback}. Copy "
                 "the model's tokenizer files into the directory for real text.")


def _first_id(value, default: int) -> int:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return default if value is None else int(value)


def _check_safetensors(weight_file: Path) -> tuple[int, int]:
    """Read the header: a truncated or corrupt file fails here with a clear message, not deep in loading.

    -> (number of elements in its tensors, bytes they take as stored).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(weight_file), framework="pt") as handle:
            keys = list(handle.keys())
            size = weight_file.stat().st_size
            for key in keys[-1:]:
                handle.get_slice(key)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ModelLoadError(f"Weight file {weight_file} is corrupt or truncated ({exc}): re-download it.") from exc
    if not keys:
        raise ModelLoadError(f"Weight file {weight_file} holds no tensors: re-download it.")
    # The header lists byte ranges; a file cut short passes the header check but not this one.
    with open(weight_file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelLoadError(f"Weight file {weight_file} is truncated ({size} bytes, header expects "
                             f"{8 + header_len + end}): re-download it.")
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    num_elements = sum(math.prod(v["shape"]) for v in tensors)
    return num_elements, sum(v["data_offsets"][1] - v["data_offsets"][0] for v in tensors)


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub model: from the cache, or downloaded when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    except HFValidationError as exc:
        raise ModelLoadError(f"{repo_id!r} is neither an existing path nor a valid hub id ({exc}): check the "
                             "spelling, or give a local directory or a hub id like 'org/name'.") from exc
    if _offline():
        raise ModelLoadError(f"Hub model {repo_id!r} is not in the local Hugging Face cache and offline mode is set "
                             "(HF_HUB_OFFLINE): download it on a connected machine (`hf download "
                             f"{repo_id}`) or pass a local directory.")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"Hub model {repo_id!r} does not exist or needs a login: check the id.") from exc
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise ModelLoadError(f"Hub model {repo_id!r} is not in the local cache and could not be downloaded "
                             f"({type(exc).__name__}: {exc}): connect to the network, or pass a local directory.") from exc


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
