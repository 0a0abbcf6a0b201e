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

from engine import presets
from engine.adapters import DecoderAdapter, ModelSpec, adapter_for, check_supported
from engine.errors import InvalidSettingsError, ModelLoadError
from engine.memory import check_fits
from engine.tokenizer import Tokenizer, byte_tokenizer, from_hf

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
    if name not in presets.PRESETS:
        raise ModelLoadError(f"Unknown synthetic preset {name!r}. Presets: {', '.join(presets.PRESETS)}.")
    from transformers import AutoModelForCausalLM

    config = presets.preset_config(name)
    if max_positions is not None:
        config.max_position_embeddings = max_positions
    check_supported(config.model_type)
    # Built on the meta device and materialised directly on the target: a 13B model's random weights
    # never pass through host memory.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weight_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    check_fits(weight_bytes, device, what=f"synthetic:{name} in {dtype_name(dtype)}",
               fix="choose a smaller preset (e.g. a tiny-* one), a 16-bit dtype, or a device with more memory.")
    model.to_empty(device=device)
    init_random_weights_(model, std=_init_std(config), seed=seed)
    model.eval()
    tok = byte_tokenizer(bos=presets.SYNTHETIC_BOS_ID, eos=presets.SYNTHETIC_EOS_ID, pad=presets.SYNTHETIC_PAD_ID)
    return LoadedModel(source=SYNTHETIC_PREFIX + name, name=name, hf_model=model, adapter=adapter_for(model),
                       tokenizer=tok, device=device, dtype=dtype, load_s=0.0,
                       notes=["random weights (synthetic preset): the shapes are real, the text is not"])


def _init_std(config) -> float:
    return float(getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02)


@torch.no_grad()
def init_random_weights_(model: torch.nn.Module, *, std: float, seed: int) -> None:
    """Initialise every parameter and buffer in place on its device (after `to_empty`)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "inv_freq"):
            fresh = type(module)(module.config)  # recomputes inv_freq (a few floats) for this config
            for buf_name, buf in fresh.named_buffers(recurse=False):
                getattr(module, buf_name).copy_(buf)
            module.attention_scaling = fresh.attention_scaling
            continue
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            weight.normal_(0.0, std, generator=gen)
        elif isinstance(weight, torch.Tensor) and weight.dim() == 1:  # LayerNorm / RMSNorm scales
            weight.fill_(1.0)
        if isinstance(bias, torch.Tensor):
            if isinstance(module, torch.nn.Linear):
                bias.normal_(0.0, std, generator=gen)  # non-zero so the bias path is exercised
            else:
                bias.zero_()
    model.tie_weights()


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
    check_supported(config.get("model_type"), config.get("architectures"))
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
                                                           low_cpu_mem_usage=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"Could not read the model in {path}: {exc}. Re-download or re-convert the weights.") from exc
    missing = [k for k in info.get("missing_keys", []) if "rotary_emb" not in k]
    if missing:
        raise ModelLoadError(f"The weights in {path} lack {len(missing)} tensors (e.g. {missing[0]}): the checkpoint "
                             "is incomplete or belongs to another model. Re-download it.")
    model = model.to(device).eval()
    notes: list[str] = []
    try:
        from transformers import AutoTokenizer

        tok = from_hf(AutoTokenizer.from_pretrained(path), model.generation_config)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure falls back to bytes, and says so
        cfg = model.config
        tok = byte_tokenizer(bos=cfg.bos_token_id or 1, eos=cfg.eos_token_id or 2, pad=cfg.pad_token_id or 0)
        notes.append(f"no usable tokenizer in {path.name} ({type(exc).__name__}); text is read as bytes")
    name = "demo (Shakespeare)" if source == "demo" else path.name if path.name != "snapshots" else source
    return LoadedModel(source=source, name=name, hf_model=model, adapter=adapter_for(model), tokenizer=tok,
                       device=device, dtype=dtype, load_s=0.0, notes=notes)


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
