"""Each peer's command line, read off its README and its argument parser, and the environment it runs in.

Placement (both peers, every run): `--percent 100 0 0 100 100 0` = weights 100 % on the GPU, the attention (K/V)
cache 100 % on the CPU, activations on the GPU; dummy weights (`--path _DUMMY_`: FlexGen fills them with ones).
- flexgen, flexgen-cpu: FlexGen 0.1.8 `python -m flexgen.flex_opt`, one GPU batch of B sequences; its defaults
  (read from add_parser_arguments) overlap I/O with compute and pin the weights; `--cpu-cache-compute` runs
  attention on the CPU over the host-resident cache.
- kvpr: KVPR's throughput test, its FlexGen fork `python -m flexgen.flex_opt --kv-partial --overlap --pin-weight`
  (its README runs `--percent 0 100 0 100 0 100`: weights on the CPU too; here they stay on the GPU as above).
- kvpr-hf: KVPR's latency test, `run_hf_ds.py --kv-partial` on its modified transformers 4.47 (OffloadedStaticCache
  with recomputation), `--dummy` weights written once per model and reloaded from there; weights on the GPU.
Both KVPR entry points choose the split themselves (`get_optimal_split_point`, fixed A100 constants) and print it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from bench.peers.runner import PeerCommand
from bench.peers.shapes import OptModel, Shape

PEERS = ("flexgen", "kvpr", "flexgen-cpu", "kvpr-hf")
PERCENT = ("100", "0", "0", "100", "100", "0")  # weights GPU/CPU, cache GPU/CPU, activations GPU/CPU
LABELS = {"flexgen": "FlexGen 0.1.8", "flexgen-cpu": "FlexGen 0.1.8", "kvpr": "KVPR code 1712a52 (FlexGen path)",
          "kvpr-hf": "KVPR code 1712a52 (transformers path)"}
VARIANTS = {"flexgen": "K/V on the CPU, attention on the GPU", "flexgen-cpu": "K/V on the CPU, attention on the CPU",
            "kvpr": "K/V on the CPU, --kv-partial (its split), overlap",
            "kvpr-hf": "K/V on the CPU (OffloadedStaticCache), --kv-partial (its split)"}
NEEDS = {
    "flexgen": "flexgen 0.1.8 (PyPI, --target install): torch>=1.12, transformers>=4.24 (the machine's own), numpy, "
               "tqdm, attrs; a CUDA GPU (OptLM makes CUDA streams)",
    "kvpr": "KVPR's code at 1712a52: its own transformers 4.47.0.dev0 tree (transformers/src, which imports "
            "flexgen.timer from the same repository), tokenizers>=0.20,<0.21, huggingface-hub>=0.23.2,<1.0, "
            "accelerate, torch>=1.12 (carried: tokenizers 0.20.3, huggingface-hub 0.26.5, accelerate 1.2.1); "
            "a CUDA GPU",
}
NEEDS["flexgen-cpu"] = NEEDS["flexgen"]
NEEDS["kvpr-hf"] = NEEDS["kvpr"]


@dataclass(frozen=True)
class PeerInstall:
    """Where the peers were put on this machine (the GPU command's prefix puts them there)."""

    kvpr_dir: Path  # KVPR's tree at 1712a52: run_hf_ds.py, flexgen/, transformers/src/
    kvpr_site: Path  # --target install of KVPR's wheels
    flexgen_site: Path  # --target install of flexgen 0.1.8
    python: str = sys.executable

    def pythonpath(self, peer: str) -> tuple[str, ...]:
        if peer.startswith("flexgen"):
            return (str(self.flexgen_site),)
        # KVPR's transformers first (before the machine's 5.x), its flexgen fork next, then its wheels.
        return (str(self.kvpr_dir / "transformers" / "src"), str(self.kvpr_dir), str(self.kvpr_site))

    def missing(self, peer: str) -> str | None:
        """What of the peer's install is not there, or None."""
        need = [self.flexgen_site / "flexgen" / "flex_opt.py"] if peer.startswith("flexgen") else [
            self.kvpr_dir / "run_hf_ds.py", self.kvpr_dir / "flexgen" / "flex_opt.py",
            self.kvpr_dir / "transformers" / "src" / "transformers" / "__init__.py", self.kvpr_site / "tokenizers"]
        absent = [str(p) for p in need if not p.exists()]
        return f"not installed here (missing {', '.join(absent)}): run the GPU command's install prefix" if absent \
            else None

    def probe(self, peer: str, *, cwd: Path) -> PeerCommand:
        """A short import of the peer's stack in its environment: the versions it sees, where they come from."""
        modules = "flexgen" if peer.startswith("flexgen") else "flexgen tokenizers huggingface_hub accelerate"
        code = ("import json, sys, importlib; import torch, transformers\n"
                "out = {'python': sys.version.split()[0], 'torch': torch.__version__,"
                " 'cuda': torch.cuda.is_available(), 'transformers': transformers.__version__,"
                " 'transformers_file': transformers.__file__}\n"
                f"for name in {modules.split()!r}:\n"
                "    m = importlib.import_module(name)\n"
                "    out[name] = getattr(m, '__version__', None) or m.__file__\n"
                "print('PROBE ' + json.dumps(out))")
        return PeerCommand(argv=(self.python, "-c", code), cwd=cwd, pythonpath=self.pythonpath(peer))


def peer_command(peer: str, model: OptModel, shape: Shape, *, install: PeerInstall, cwd: Path, name: str,
                 cut_gen_len: int | None = None, weights_root: Path | None = None) -> PeerCommand:
    """The command line of one peer run; its logs and offload folders go under `cwd`."""
    py, b, p, n = install.python, str(shape.batch), str(shape.prompt_tokens), str(shape.new_tokens)
    log = str(cwd / "logs" / f"{name}.benchlog")
    cut = ("--cut-gen-len", str(cut_gen_len)) if cut_gen_len else ()
    if peer in ("flexgen", "flexgen-cpu"):
        argv = (py, "-m", "flexgen.flex_opt", "--model", model.hf_name, "--path", "_DUMMY_",
                "--offload-dir", str(cwd / "offload" / name), "--prompt-len", p, "--gen-len", n,
                "--gpu-batch-size", b, "--num-gpu-batches", "1", "--percent", *PERCENT, "--log-file", log, *cut)
        argv += ("--cpu-cache-compute",) if peer == "flexgen-cpu" else ()
    elif peer == "kvpr":
        argv = (py, "-m", "flexgen.flex_opt", "--model", model.hf_name, "--path", "_DUMMY_",
                "--offload-dir", str(cwd / "offload" / name), "--num-test-runs", "1", "--prompt-len", p,
                "--gen-len", n, "--gpu-batch-size", b, "--num-gpu-batches", "1", "--percent", *PERCENT,
                "--kv-partial", "--overlap", "--pin-weight", "--log-file", log,
                "--csv-file", str(cwd / "logs" / f"{name}.csv"), *cut)
    elif peer == "kvpr-hf":
        if weights_root is None:
            raise ValueError("kvpr-hf needs weights_root: where --dummy writes its weights")
        argv = (py, str(install.kvpr_dir / "run_hf_ds.py"), "--model", model.hf_name, "--dummy",
                "--batch-size", b, "--prompt-len", p, "--gen-len", n, "--kv-partial",
                "--offload-dir", str(weights_root), "--log-file", log, "--csv-file", str(cwd / "logs" / f"{name}.csv"))
    else:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    return PeerCommand(argv=argv, cwd=cwd, pythonpath=install.pythonpath(peer))


def peer_settings(peer: str, *, cut_gen_len: int | None) -> dict:
    """The run's settings as the Compare panel's flat keys (offload.* as KV Lab names them) plus the peer's own."""
    attention = "cpu" if peer == "flexgen-cpu" else "gpu"
    out = {"peer": LABELS[peer], "offload.placement": "cpu", "offload.split": "peer's own" if peer.startswith("kvpr")
           else 0.0, "peer.attention": attention, "peer.dtype": "float16", "peer.weights": "dummy, on the GPU"}
    if peer.startswith("flexgen") or peer == "kvpr":
        out |= {"peer.percent": " ".join(PERCENT), "peer.overlap": True, "peer.pin_weight": True,
                "peer.num_gpu_batches": 1}
    if cut_gen_len:
        out["peer.cut_gen_len"] = cut_gen_len
    return out
