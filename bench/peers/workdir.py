"""The folder a peer runs in: what its code reads from the hub, made locally, because the GPU machine has no network.

FlexGen's `run_flexgen` tokenizes its benchmark prompt with `AutoTokenizer.from_pretrained("facebook/opt-30b")`
and KVPR's `run_hf_ds.py` reads `AutoConfig` and `AutoTokenizer` of `facebook/<model>`; transformers takes a
relative path that exists as a local folder before it asks the hub, so the peer runs with this folder as its
working directory, which holds `facebook/<model>/`:
- config.json: the model's public config (KVPR's --dummy path builds and saves its dummy weights from it);
- tokenizer.json + tokenizer_config.json: a word-level tokenizer of the peers' one benchmark prompt ("Paris is
  the capital city of", padded on the left to the prompt length) with OPT's special ids (<s> 0, <pad> 1, </s> 2,
  <unk> 3). Both peers run dummy weights, so token ids only need the right count and padding: the timing is the
  same as with OPT's BPE vocabulary, which is not on the machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.peers.shapes import OptModel

PROMPT_WORDS = ("Paris", "is", "the", "capital", "city", "of")
SPECIAL_TOKENS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
FLEXGEN_TOKENIZER = "facebook/opt-30b"  # what run_flexgen loads for every OPT model


def tokenizer_json() -> dict:
    vocab = dict(SPECIAL_TOKENS) | {word: 4 + i for i, word in enumerate(PROMPT_WORDS)}
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for token, i in SPECIAL_TOKENS.items()]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def tokenizer_config_json() -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "</s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 2048, "padding_side": "left",
            "clean_up_tokenization_spaces": False}


def write_model_folder(folder: Path, model: OptModel | None) -> Path:
    """folder/ with the tokenizer files, and config.json when a model is given."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(), indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_json(), indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=1))
    if model is not None:
        (folder / "config.json").write_text(json.dumps(model.config_json(), indent=1))
    return folder


def prepare_workdir(root: Path, models: list[OptModel]) -> Path:
    """root/facebook/<model>/ for every model and root/facebook/opt-30b/ (FlexGen's tokenizer); -> root."""
    root.mkdir(parents=True, exist_ok=True)
    for model in models:
        write_model_folder(root / model.hf_name, model)
    if not (root / FLEXGEN_TOKENIZER).exists():
        write_model_folder(root / FLEXGEN_TOKENIZER, None)
    return root


def dummy_weights_root(work_root: Path, *, needed_bytes: int) -> Path:
    """Where KVPR's --dummy path writes and reloads its weights: /dev/shm when it has room (memory, so the 13-26 GB
    round trip costs seconds), else the working folder's disk."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > needed_bytes * 1.2:
            path = shm / f"{work_root.name}-weights"
            path.mkdir(parents=True, exist_ok=True)
            return path
    except OSError:
        pass
    path = work_root / "weights"
    path.mkdir(parents=True, exist_ok=True)
    return path
