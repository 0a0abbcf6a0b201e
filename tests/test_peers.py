"""The peers suite on the CPU: KV Lab's part end to end on tiny-opt (the code path the GPU run takes), the peers'
output parsers against sample outputs, the subprocess runner's failure records, the whole suite with stand-in peer
installs, and the converter from the suite's JSON to the records the Compare panel shows.

The SAMPLE_* texts below are SAMPLES written for these tests from the peers' code (FlexGen 0.1.8 `run_flexgen`,
KVPR 1712a52 `flexgen/flex_opt.py` `run_flexgen` and `run_hf_ds.py` `run_generation`, whose figures all come from
`flexgen.utils.write_benchmark_log`): the lines and their formats are the peers', the figures are made up.
INTERLEAVED_STDERR is real: FlexGen 0.1.8 started on a machine without a GPU (paths shortened).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.peers import commands, results
from bench.peers.parse import PeerOutputError, failure_reason, parse_benchmark_log
from bench.peers.runner import PeerCommand, run_peer
from bench.peers.shapes import SHAPES, full_kv_bytes_per_step, h2d_bytes_per_step, opt_model
from bench.peers.workdir import prepare_workdir
from engine.errors import InvalidSettingsError
from engine.lab.compare import compare_runs
from engine.lab.peer_runs import peer_failures, peer_records, read_peer_results
from engine.presets import PRESETS

pytestmark = pytest.mark.usefixtures("profile_cache")

# SAMPLE: FlexGen 0.1.8, python -m flexgen.flex_opt --model facebook/opt-6.7b --path _DUMMY_ --prompt-len 256
#         --gen-len 32 --gpu-batch-size 32 --num-gpu-batches 1 --percent 100 0 0 100 100 0
SAMPLE_FLEXGEN = """\
<run_flexgen>: args.model: facebook/opt-6.7b
model size: 12.386 GB, cache size: 4.500 GB, hidden size (prefill): 0.070 GB
init weight...
warmup - generate
benchmark - generate
TorchDevice: cuda:0
  cur_mem: 12.6350 GB,  peak_mem: 17.2345 GB
TorchDevice: cpu
  cur_mem: 4.6350 GB,  peak_mem: 0.0000 GB
model size: 12.386 GB\tcache size: 4.500 GB\thidden size (p): 0.070 GB
peak gpu mem: 17.234 GB\tprojected: False
prefill latency: 0.812 s\tprefill throughput: 10088.670 token/s
decode latency: 3.100 s\tdecode throughput: 320.000 token/s
total latency: 3.912 s\ttotal throughput: 261.759 token/s
"""

# SAMPLE: KVPR 1712a52, python -m flexgen.flex_opt ... --kv-partial --overlap --pin-weight --cut-gen-len 16
SAMPLE_KVPR = """\
<run_flexgen>: args.model: facebook/opt-6.7b
percent: [100, 0, 0, 100, 100, 0]
prompt-len: 1984
gen-len: 64
gpu-batch-size: 8
num-gpu-batches: 1
cpu-cache-compute: False
pin_memory: True
overlap: True
kv_partial: True
compress-weight: False
load_partial_weight: False
model size: 12.386 GB, cache size: 7.996 GB, hidden size (prefill): 0.125 GB
init weight...
recompute_len: 1442
warmup - generate
gen_len: 1 num_layers: 66 num_gpu_batches: 1
benchmark - generate
gen_len: 64 num_layers: 66 num_gpu_batches: 1
model size: 12.386 GB\tcache size: 7.996 GB\thidden size (p): 0.125 GB
peak gpu mem: 16.102 GB\tprojected: True
prefill latency: 1.790 s\tprefill throughput: 8866.815 token/s
decode latency: 6.300 s\tdecode throughput: 80.000 token/s
total latency: 8.090 s\ttotal throughput: 63.288 token/s
"""

# SAMPLE: KVPR 1712a52, python run_hf_ds.py --model facebook/opt-6.7b --dummy --batch-size 32 --prompt-len 256
#         --gen-len 32 --kv-partial
SAMPLE_KVPR_HF = """\
prompt-len: 256
gen-len: 32
batch-size: 32
pin_memory: 1

create dummy weights
load model
recompute_len: 203
warmup
benchmark
Outputs:
----------------------------------------------------------------------
0: Paris is the capital city of
----------------------------------------------------------------------
31: Paris is the capital city of
----------------------------------------------------------------------

model size: 12.386 GB\tcache size: 4.500 GB\thidden size (p): 0.070 GB
peak gpu mem: 14.950 GB\tprojected: False
prefill latency: 0.402 s\tprefill throughput: 20378.109 token/s
decode latency: 2.790 s\tdecode throughput: 355.556 token/s
total latency: 3.192 s\ttotal throughput: 320.802 token/s
"""

# RECORDED: FlexGen 0.1.8 on a machine without a GPU; its four copy threads fail beside the main program.
INTERLEAVED_STDERR = """\
Exception in thread Thread-1 (copy_worker_func):
Traceback (most recent call last):
  File "threading.py", line 1045, in _bootstrap_inner
  File "flexgen/pytorch_backend.py", line 880, in copy_worker_func
  File "torch/cuda/__init__.py", line 689, in set_device
AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'
Exception in thread Thread-4 (copy_worker_func):
Traceback (most recent call last):
  File "threading.py", line 1045, in _bootstrap_inner
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
self.run()
  File "threading.py", line 982, in run
  File "flexgen/flex_opt.py", line 1327, in <module>
  File "flexgen/pytorch_backend.py", line 880, in copy_worker_func
  File "flexgen/flex_opt.py", line 1219, in run_flexgen
  File "torch/cuda/__init__.py", line 689, in set_device
AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'
  File "flexgen/flex_opt.py", line 618, in __init__
  File "torch/cuda/streams.py", line 40, in __new__
RuntimeError: torch.cuda.Stream requires CUDA support
Exception in thread Thread-2 (copy_worker_func):
Traceback (most recent call last):
  File "threading.py", line 1045, in _bootstrap_inner
AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'
Exception ignored in: <function OptLM.__del__ at 0x7f85b05c9940>
Traceback (most recent call last):
  File "flexgen/flex_opt.py", line 1149, in __del__
AttributeError: 'OptLM' object has no attribute 'weight_home'
"""


# -- parsers -------------------------------------------------------------------------------------------------------
def test_benchmark_log_parses_flexgen_kvpr_and_kvpr_hf_samples():
    flexgen = parse_benchmark_log(SAMPLE_FLEXGEN)
    assert (flexgen.decode_latency_s, flexgen.decode_tok_s, flexgen.prefill_latency_s) == (3.1, 320.0, 0.812)
    assert flexgen.recompute_tokens is None and flexgen.projected is False and flexgen.peak_gpu_mem_gb == 17.234
    assert flexgen.step_ms(new_tokens=32) == pytest.approx(100.0)  # 3.1 s over 31 decode steps
    kvpr = parse_benchmark_log(SAMPLE_KVPR)
    assert kvpr.recompute_tokens == 1442 and kvpr.projected is True and kvpr.cache_size_gb == 7.996
    assert kvpr.step_ms(new_tokens=64) == pytest.approx(100.0)
    hf = parse_benchmark_log(SAMPLE_KVPR_HF)
    assert hf.recompute_tokens == 203 and hf.decode_tok_s == 355.556
    assert 32 * 31 / hf.decode_latency_s == pytest.approx(hf.decode_tok_s, rel=1e-3)  # the peers' own definition


def test_a_log_without_its_decode_line_is_an_error_not_a_zero():
    with pytest.raises(PeerOutputError):
        parse_benchmark_log(SAMPLE_FLEXGEN.split("decode latency")[0])


def test_failure_reason_finds_the_main_programs_error_among_interleaved_thread_tracebacks():
    assert failure_reason(INTERLEAVED_STDERR) == "RuntimeError: torch.cuda.Stream requires CUDA support"
    assert failure_reason("warming up\nAssertionError: Torch not compiled with CUDA enabled\n") == \
        "AssertionError: Torch not compiled with CUDA enabled"
    assert failure_reason("", "Killed") == "Killed"
    # RECORDED too (CPU, FlexGen 0.1.8 with --cpu-cache-compute): threads wrote into the main traceback's lines
    mangled = """\
Exception in thread Exception in thread Thread-2 (copy_worker_func):
Traceback (most recent call last):
  File "threading.py", line 1045, in _bootstrap_inner
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
self.run()  File "torch/cuda/__init__.py", line 689, in set_device
AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'
AttributeError:     ^^^^^^^^^^^^^module 'torch._C' has no attribute '_cuda_setDevice'    model = OptLM(opt_config,
AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'
    raise RuntimeError("torch.cuda.Stream requires CUDA support")
RuntimeError: torch.cuda.Stream requires CUDA support
"""
    assert failure_reason(mangled) == "RuntimeError: torch.cuda.Stream requires CUDA support"


# -- schedules, shapes, commands ------------------------------------------------------------------------------------
def test_opt_models_match_kv_labs_presets_and_every_shape_fits_opts_positions():
    for name in ("opt-6.7b", "opt-13b"):
        model, preset = opt_model(name), PRESETS[name]
        assert (model.hidden_size, model.num_layers, model.ffn_dim) == (
            preset["hidden_size"], preset["num_hidden_layers"], preset["ffn_dim"])
        assert model.config_json()["max_position_embeddings"] == preset["max_position_embeddings"] == 2048
    assert all(s.max_tokens <= 2048 for s in SHAPES.values())
    assert abs(opt_model("opt-6.7b").weight_bytes / 2**30 - 12.4) < 0.3  # FlexGen prints 12.4 GB for it


def test_peers_pcie_bytes_follow_their_schedules():
    model, shape = opt_model("opt-6.7b"), SHAPES["kvpr"]
    full = full_kv_bytes_per_step(model, shape)
    # FlexGen copies every K/V of positions [0, P + i): mean P + N/2 over steps 1..N-1
    assert full == 32 * 2 * 32 * 4096 * 2 * (256 + 16)
    assert h2d_bytes_per_step("flexgen-cpu", model, shape) == 32 * 32 * 4096 * 4  # only fp32 attention outputs
    l = 203
    kvpr = h2d_bytes_per_step("kvpr", model, shape, recompute_tokens=l)
    assert kvpr == full - 32 * (2 * 32 * 4096 * 2 * l - 32 * 4096 * 2 * l)  # K/V of l slots swapped for activations
    # the transformers path prefetches the whole static buffer [l, P + N) of layers 1..L-1
    assert h2d_bytes_per_step("kvpr-hf", model, shape, recompute_tokens=0) == 31 * 2 * 32 * 4096 * 2 * 288


def test_peer_commands_keep_weights_on_the_gpu_kv_on_the_cpu_and_their_own_python_path(tmp_path):
    install = commands.PeerInstall(kvpr_dir=tmp_path / "kvpr", kvpr_site=tmp_path / "ks", flexgen_site=tmp_path / "fs")
    model, shape = opt_model("opt-13b"), SHAPES["suite"]
    flexgen = commands.peer_command("flexgen-cpu", model, shape, install=install, cwd=tmp_path, name="a",
                                    cut_gen_len=8)
    argv = " ".join(flexgen.argv)
    assert "--percent 100 0 0 100 100 0" in argv and "--cpu-cache-compute" in argv and "--path _DUMMY_" in argv
    assert "--gpu-batch-size 8" in argv and "--prompt-len 1984 --gen-len 64" in argv and "--cut-gen-len 8" in argv
    assert flexgen.pythonpath == (str(tmp_path / "fs"),)
    kvpr = commands.peer_command("kvpr", model, shape, install=install, cwd=tmp_path, name="b")
    assert {"--kv-partial", "--overlap", "--pin-weight"} <= set(kvpr.argv)
    assert kvpr.pythonpath[0] == str(tmp_path / "kvpr" / "transformers" / "src")  # before the machine's transformers
    hf = commands.peer_command("kvpr-hf", model, shape, install=install, cwd=tmp_path, name="c", weights_root=tmp_path)
    assert hf.argv[1].endswith("run_hf_ds.py") and "--dummy" in hf.argv and "--kv-partial" in hf.argv
    assert "not installed" in install.missing("kvpr")


def test_workdir_tokenizer_and_config_load_offline_and_pad_on_the_left(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    prepare_workdir(tmp_path, [opt_model("opt-6.7b")])
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "facebook" / "opt-30b"), padding_side="left")
    ids = tokenizer(["Paris is the capital city of"], padding="max_length", max_length=10).input_ids[0]
    assert ids == [1, 1, 1, 1, 4, 5, 6, 7, 8, 9]  # OPT's pad id 1, which FlexGen masks out
    config = AutoConfig.from_pretrained(str(tmp_path / "facebook" / "opt-6.7b"))
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("opt", 4096, 32)


def test_jobs_run_every_models_cheap_comparisons_before_the_costly_peers():
    from bench.suites.peers import plan_jobs

    models, shapes = [opt_model("opt-6.7b"), opt_model("opt-13b")], [SHAPES["kvpr"], SHAPES["suite"]]
    jobs = plan_jobs(models, shapes, list(commands.PEERS))
    names = [(kind, m.name, s.name if s else None, p) for kind, m, s, p in jobs]
    assert names[:5] == [("kvlab", "opt-6.7b", None, None)] + [("peer", "opt-6.7b", "kvpr", p) for p in commands.PEERS]
    assert names[5:8] == [("peer", "opt-6.7b", "suite", "flexgen"), ("peer", "opt-6.7b", "suite", "kvpr"),
                          ("kvlab", "opt-13b", None, None)]
    assert names[-1] == ("peer", "opt-13b", "suite", "kvpr-hf")
    assert {p for _, _, _, p in names[12:]} == {"flexgen-cpu", "kvpr-hf"}
    assert len(names) == 2 + 2 * 2 * len(commands.PEERS)


def test_peers_cut_long_runs_with_their_own_option_except_the_static_cache_path():
    from bench.suites.peers import _cut

    kvpr, suite = SHAPES["kvpr"], SHAPES["suite"]
    assert (_cut("flexgen-cpu", kvpr, -1), _cut("flexgen", kvpr, -1), _cut("kvpr", kvpr, -1)) == (8, None, None)
    assert (_cut("flexgen", suite, -1), _cut("kvpr", suite, -1), _cut("flexgen-cpu", suite, -1)) == (16, 16, 8)
    assert _cut("kvpr-hf", suite, -1) is None and _cut("kvpr-hf", suite, 4) is None and _cut("kvpr", suite, 0) is None
    assert _cut("flexgen", suite, 20) == 20 and _cut("flexgen", suite, 64) is None


# -- the runner: failures are recorded, never raised -----------------------------------------------------------------
def _command(tmp_path: Path, code: str, **kw) -> PeerCommand:
    return PeerCommand(argv=(sys.executable, "-c", textwrap.dedent(code)), cwd=tmp_path, pythonpath=("/nowhere",), **kw)


def test_a_peer_that_raises_is_recorded_with_its_error(tmp_path):
    outcome = run_peer(_command(tmp_path, "raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')"),
                       name="oom", timeout_s=60)
    assert outcome.status == "failed" and outcome.returncode == 1 and outcome.log is None
    assert outcome.error == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "Traceback" in outcome.stderr_tail


def test_a_peer_that_hangs_after_its_error_is_ended_and_one_past_its_limit_times_out(tmp_path):
    hangs = """
        import threading, time
        threading.Thread(target=time.sleep, args=(600,)).start()  # FlexGen's copy threads outlive the main program
        raise ValueError('bad --percent')
        """
    outcome = run_peer(_command(tmp_path, hangs), name="hang", timeout_s=60, hang_grace_s=1.0)
    assert outcome.status == "failed" and outcome.wall_s < 30
    assert outcome.error.startswith("ValueError: bad --percent") and "ended" in outcome.error
    slow = run_peer(_command(tmp_path, "import time; print('init weight...', flush=True); time.sleep(600)"),
                    name="slow", timeout_s=2)
    assert slow.status == "timeout" and "limit of 2 s" in slow.error and slow.returncode == -15  # SIGTERM


def test_a_peer_runs_offline_on_its_own_python_path_and_its_log_is_read(tmp_path):
    code = f"""
        import importlib.util, os
        print('env', os.environ['PYTHONPATH'], os.environ['HF_HUB_OFFLINE'], importlib.util.find_spec('bench'))
        print({SAMPLE_FLEXGEN!r})
        """
    outcome = run_peer(_command(tmp_path, code), name="ok", timeout_s=60)
    assert outcome.ok and outcome.log.decode_tok_s == 320.0
    assert "env /nowhere 1 None" in outcome.stdout_tail  # KV Lab's checkout is not on a peer's path


# -- the suite -------------------------------------------------------------------------------------------------------
def test_kvlab_part_runs_end_to_end_on_tiny_opt_and_keeps_smoke_figures_out_of_the_summary(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"kept_key": {"value": 1.0, "unit": "x"}}))
    assert main(["peers", "--peers", "none", "--results-dir", str(tmp_path)]) == 0
    assert "K/V on the CPU, split 0" in capsys.readouterr().out
    payload = json.loads((tmp_path / "peers_quick.json").read_text())
    runs = payload["details"]["runs"]
    assert [r["placement"] for r in runs] == ["cpu0", "cpu", "hybrid"]
    assert all(r["status"] == "ok" and r["tok_s"] > 0 and r["step_ms"] > 0 for r in runs), runs
    by = {r["placement"]: r for r in runs}
    assert by["cpu0"]["split"] == 0.0 and by["cpu0"]["h2d_bytes_per_step"] >= by["cpu"]["h2d_bytes_per_step"]
    assert by["hybrid"]["resident_tokens"] > 0 and by["cpu"]["resident_tokens"] == 0
    assert all(r["pct_pcie_floor"] > 0 for r in runs)
    assert (tmp_path / "peers_quick.md").exists()
    assert json.loads((tmp_path / "summary.json").read_text()) == {"kept_key": {"value": 1.0, "unit": "x"}}
    records = peer_records(read_peer_results(tmp_path / "peers_quick.json"), first_run_id=1)
    assert [r.run_id for r in records] == [1, 2, 3] and {r.settings["peer"] for r in records} == {"KV Lab"}
    assert {r.device for r in records} == {"cpu"} and not records[0].on_gpu


def _fake_installs(root: Path) -> commands.PeerInstall:
    """Stand-ins for the peers' installs: each entry point prints its sample log, KVPR's transformers path fails as a
    version check would; KVPR's fork prints a recompute_len derived from its --prompt-len."""
    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))

    flexgen_site, kvpr_dir, kvpr_site = root / "fg-site", root / "kvpr", root / "kvpr-site"
    write(flexgen_site / "flexgen" / "__init__.py", "")
    write(flexgen_site / "flexgen" / "flex_opt.py", f"""
        import sys
        text = {SAMPLE_FLEXGEN!r}
        if '--cpu-cache-compute' in sys.argv:
            text = text.replace('decode latency: 3.100 s\\tdecode throughput: 320.000',
                                'decode latency: 6.200 s\\tdecode throughput: 160.000')
        print(text)
        """)
    write(kvpr_dir / "flexgen" / "__init__.py", "")
    write(kvpr_dir / "flexgen" / "flex_opt.py", f"""
        import sys
        prompt = int(sys.argv[sys.argv.index('--prompt-len') + 1])
        print({SAMPLE_KVPR!r}.replace('recompute_len: 1442', f'recompute_len: {{prompt * 3 // 4}}'))
        """)
    write(kvpr_dir / "run_hf_ds.py", """
        raise ImportError('tokenizers>=0.20,<0.21 is required for a normal functioning of this module, but found '
                          'tokenizers==0.23.2.')
        """)
    write(kvpr_dir / "transformers" / "src" / "transformers" / "__init__.py", "__version__ = '4.47.0.dev0'\n")
    for name, version in (("tokenizers", "0.20.3"), ("huggingface_hub", "0.26.5"), ("accelerate", "1.2.1")):
        write(kvpr_site / name / "__init__.py", f"__version__ = {version!r}\n")
    return commands.PeerInstall(kvpr_dir=kvpr_dir, kvpr_site=kvpr_site, flexgen_site=flexgen_site)


def test_suite_records_peers_that_ran_and_one_that_failed_and_the_records_compare(tmp_path):
    install = _fake_installs(tmp_path / "installs")
    out = tmp_path / "results"
    assert main(["peers", "--placements", "cpu", "--results-dir", str(out), "--kvpr-dir", str(install.kvpr_dir),
                 "--kvpr-site", str(install.kvpr_site), "--flexgen-site", str(install.flexgen_site)]) == 0
    payload = json.loads((out / "peers_quick.json").read_text())
    runs = {r["engine"]: r for r in payload["details"]["runs"]}
    assert set(runs) == {"kvlab", "flexgen", "flexgen-cpu", "kvpr", "kvpr-hf"}
    assert runs["flexgen"]["status"] == "ok" and runs["flexgen"]["tok_s"] == 320.0
    assert runs["flexgen-cpu"]["tok_s"] == 160.0 and runs["flexgen-cpu"]["settings"]["peer.attention"] == "cpu"
    assert runs["kvpr"]["recompute_tokens"] == 18 and runs["kvpr"]["split"] == 0.75  # 3/4 of the 24-token prompt
    assert runs["kvpr"]["h2d_bytes_per_step"] < runs["kvpr"]["full_kv_bytes_per_step"]
    failed = runs["kvpr-hf"]
    assert failed["status"] == "failed" and failed["error"].startswith("ImportError: tokenizers>=0.20,<0.21")
    assert "tokenizers>=0.20,<0.21" in failed["needs"] and "run_hf_ds.py" in failed["command"]
    assert payload["details"]["peer_environments"]["kvpr"]["transformers"] == "4.47.0.dev0"
    assert {r["model"] for r in payload["details"]["ratios"]["vs_flexgen_ratio"]} == {"opt-125m"}
    flex_ratio = payload["details"]["ratios"]["vs_flexgen_ratio"][0]
    assert flex_ratio["peer_tok_s"] == 320.0 and flex_ratio["ratio"] == runs["kvlab"]["tok_s"] / 320.0
    assert any("ImportError" in note for note in payload["notes"])
    md = (out / "peers_quick.md").read_text()
    assert "FlexGen 0.1.8" in md and "- failed" in md
    loaded = read_peer_results(out / "peers_quick.json")
    records = peer_records(loaded, first_run_id=10)
    assert [r.settings["peer"] for r in records] == ["KV Lab", commands.LABELS["flexgen"], commands.LABELS["kvpr"],
                                                     commands.LABELS["flexgen-cpu"]]
    assert any("ImportError" in line for line in peer_failures(loaded))
    table = compare_runs(records)
    assert "peer" in table.differing and "peer.attention" in table.differing
    assert table.rows[1][1] == "opt-125m (FlexGen 0.1.8)"


# -- the converter ---------------------------------------------------------------------------------------------------
def _payload(**run_fields) -> dict:
    run = {"engine": "kvpr", "label": commands.LABELS["kvpr"], "variant": commands.VARIANTS["kvpr"],
           "model": "opt-6.7b", "shape": "kvpr", "batch": 32, "prompt_tokens": 256, "new_tokens": 32, "status": "ok",
           "settings": commands.peer_settings("kvpr", cut_gen_len=None), "tok_s": 400.0, "step_ms": 80.0,
           "prefill_ms": 790.0, "recompute_tokens": 203, "split": 203 / 256, "pcie_floor_ms": 40.0,
           "h2d_bytes_per_step": 2_200_000_000} | run_fields
    return {"suite": "peers", "device": "NVIDIA H200 (132 SMs, torch 2.11.0+cu130)", "date": "2026-12-02 10:00 UTC",
            "command": "python -m bench peers", "details": {"runs": [run]}}


def test_records_carry_the_peer_its_settings_and_figures():
    (record,) = peer_records(_payload(), first_run_id=7)
    assert record.run_id == 7 and record.model == "opt-6.7b (KVPR code 1712a52 (FlexGen path))"
    assert (record.tokens_per_s, record.median_step_ms, record.pct_of_floor) == (400.0, 80.0, 50.0)
    assert record.settings["offload.split"] == round(203 / 256, 3) and record.split == 203 / 256
    assert record.settings["offload.chunk_tokens"] is None and record.steps == () and record.spans == ()
    assert record.created_at == "2026-12-02T10:00:00+00:00" and record.device_name.startswith("NVIDIA H200")
    assert record.device == "cuda" and record.on_gpu
    assert "cpu split 0.793" in record.label and any("recompute_len 203" in n for n in record.notes)
    assert record.summary()["pct_of_floor"] == 50.0


def test_unfinished_runs_make_no_record_and_bad_files_are_refused(tmp_path):
    payload = _payload(status="timeout", error="ran past its limit of 90 s and was ended", tok_s=None)
    assert peer_records(payload, first_run_id=1) == []
    assert peer_failures(payload) == ["KVPR code 1712a52 (FlexGen path) (K/V on the CPU, --kv-partial (its split), "
                                      "overlap) on opt-6.7b B32 P256 N32: timeout: ran past its limit of 90 s and "
                                      "was ended"]
    for bad in ({"suite": "offload", "details": {"runs": []}}, {"suite": "peers"},
                {"suite": "peers", "details": {"runs": [{"engine": "kvpr"}]}}):
        with pytest.raises(InvalidSettingsError):
            peer_records(bad, first_run_id=1)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(InvalidSettingsError, match="Could not read"):
        read_peer_results(tmp_path / "x.json")


def test_headlines_take_the_worst_shape_and_the_best_peer_there():
    def run(engine, shape, tok_s, **kw):
        return {"engine": engine, "label": engine, "variant": "v", "model": "opt-6.7b", "shape": shape,
                "status": "ok", "tok_s": tok_s, "step_ms": 8000 / tok_s} | kw

    runs = [run("kvlab", "kvpr", 100.0, placement="cpu"), run("kvlab", "kvpr", 50.0, placement="cpu0"),
            run("kvlab", "suite", 40.0, placement="cpu"),
            run("flexgen", "kvpr", 20.0), run("flexgen-cpu", "kvpr", 25.0), run("flexgen", "suite", 20.0),
            run("kvpr", "kvpr", 50.0), run("kvpr-hf", "kvpr", 80.0),
            run("kvpr", "suite", 10.0, status="failed")]
    heads = {h.key: h for h in results.headlines(runs, SHAPES)}
    assert heads["vs_flexgen_ratio"].value == 2.0  # the suite shape's 40/20, not the kvpr shape's 100/25
    assert "B8 P1984 N64" in heads["vs_flexgen_ratio"].unit
    assert heads["vs_kvpr_code_ratio"].value == 100.0 / 80.0 and heads["vs_kvpr_code_ratio"].peer_value == 80.0
