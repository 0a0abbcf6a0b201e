"""The hardware profiler: a quick CPU measurement, the lookups the scheduler makes, JSON round trips, the cache
(hits, refresh, corrupt and outdated entries, an unwritable directory) and the command line."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import engine.offload.profiler as profiler
from engine.offload.profiler import (
    COPY_SIZES_CPU,
    GEMM_ROWS_CPU,
    GEMM_SHAPES_CPU,
    PROFILE_VERSION,
    GemmCurve,
    HardwareProfile,
    Point,
    _interpolate,
    cache_path,
    format_table,
    hardware_profile,
    main,
    measure,
)

MiB = 1 << 20


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory; the session's (conftest `profile_cache`) is never touched."""
    root = tmp_path / "kvlab-cache"
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(root))
    return root / "hardware"


def _profile(*, name="CPU (test)", h2d_peak=54.8, notes=("hand-built",)) -> HardwareProfile:
    h2d = (Point(size=MiB, rate=48.0), Point(size=256 * MiB, rate=h2d_peak))
    gemm = (GemmCurve(hidden=4096, out_features=8192, points=(Point(512, 450.0), Point(131072, 780.0))),
            GemmCurve(hidden=4096, out_features=2048, points=(Point(512, 300.0), Point(131072, 700.0))))
    return HardwareProfile(device_type="cpu", device_name=name, driver="none", torch_version=torch.__version__,
                           measured_at="2025-01-01T00:00:00+00:00", h2d=h2d, d2h=h2d,
                           bidirectional_gb_s=0.0, hbm_copy_gb_s=2990.0, attention_gb_s=2900.0, gemm=gemm,
                           launch_us=8.0, notes=notes)


@pytest.fixture
def fake_measure(monkeypatch):
    """Replace the measurement with a counter returning a fresh hand-built profile per call."""
    calls = []

    def fake(device, *, quick=False):
        calls.append((str(device), quick))
        return _profile(h2d_peak=50.0 + len(calls))  # each measurement distinguishable

    monkeypatch.setattr(profiler, "measure", fake)
    return calls


# -- measuring ----------------------------------------------------------------------------------------------
def test_quick_cpu_measurement_is_positive_and_finite():
    p = measure("cpu", quick=True)
    assert p.device_type == "cpu" and p.version == PROFILE_VERSION and p.notes  # says the figures are the CPU's
    assert tuple(pt.size for pt in p.h2d) == tuple(pt.size for pt in p.d2h) == COPY_SIZES_CPU
    assert [(c.hidden, c.out_features) for c in p.gemm] == list(GEMM_SHAPES_CPU)
    assert all(tuple(pt.size for pt in c.points) == GEMM_ROWS_CPU for c in p.gemm)
    rates = [pt.rate for pt in p.h2d + p.d2h] + [pt.rate for c in p.gemm for pt in c.points]
    rates += [p.hbm_copy_gb_s, p.attention_gb_s, p.launch_us]
    assert all(r > 0 and math.isfinite(r) for r in rates), rates
    assert p.bidirectional_gb_s == 0.0  # no second direction to overlap on the host
    assert p.torch_version == torch.__version__ and p.driver == "none" and "CPU" in p.device_name


# -- lookups ------------------------------------------------------------------------------------------------
def test_interpolate_is_log_linear_and_clamped():
    two = (Point(size=MiB, rate=48.0), Point(size=256 * MiB, rate=54.8))
    assert _interpolate(two, 1) == 48.0 and _interpolate(two, MiB // 2) == 48.0  # below: first point
    assert _interpolate(two, 256 * MiB) == 54.8 and _interpolate(two, 1 << 40) == 54.8  # above: last point
    assert _interpolate(two, MiB) == 48.0
    assert _interpolate(two, 16 * MiB) == pytest.approx(51.4)  # log2 16 / log2 256 = half way
    assert _interpolate(two, 4 * MiB) == pytest.approx(48.0 + 0.25 * 6.8)
    three = (Point(size=10, rate=1.0), Point(size=100, rate=2.0), Point(size=1000, rate=4.0))
    assert _interpolate(three, 100) == pytest.approx(2.0)  # exactly on an inner point
    assert _interpolate(three, math.sqrt(10 * 100)) == pytest.approx(1.5)
    assert _interpolate(three, math.sqrt(100 * 1000)) == pytest.approx(3.0)
    assert _interpolate(three, 10 ** 2.9) == pytest.approx(2.0 + 0.9 * 2.0)
    one = (Point(size=64, rate=7.0),)
    assert _interpolate(one, 1) == _interpolate(one, 64) == _interpolate(one, 1e9) == 7.0
    p = _profile()
    assert p.h2d_gb_s(16 * MiB) == pytest.approx(51.4) and p.d2h_gb_s(16 * MiB) == pytest.approx(51.4)
    assert p.peak_h2d_gb_s == 54.8


def test_gemm_lookup_takes_the_nearest_shape():
    curves = tuple(GemmCurve(hidden=h, out_features=n, points=(Point(512, rate), Point(8192, rate + 100)))
                   for (h, n), rate in (((4096, 8192), 400.0), ((5120, 10240), 500.0), ((4096, 2048), 300.0)))
    p = _profile()
    p = HardwareProfile(**{**{f: getattr(p, f) for f in p.__dataclass_fields__}, "gemm": curves})
    assert p.gemm_tflop_s(512, 4096, 8192) == 400.0  # llama-2-7b / opt-6.7b K+V
    assert p.gemm_tflop_s(512, 5120, 10240) == 500.0  # llama-2-13b
    assert p.gemm_tflop_s(512, 4096, 2048) == 300.0  # llama-3-8b (GQA)
    assert p.gemm_tflop_s(8192, 8192, 16384) == 600.0  # larger than any: the largest, at its last point
    assert p.gemm_tflop_s(512, 2048, 2048) == 300.0  # smaller than any: the smallest
    assert p.gemm_tflop_s(512, 4096, 3072) == 300.0  # 12.6M elements: nearer 8.4M than 33.6M in log
    assert p.gemm_tflop_s(512, 4096, 5120) == 400.0  # 21.0M: nearer 33.6M in log
    assert p.gemm_tflop_s(2048, 4096, 8192) == pytest.approx(450.0)  # half way along that curve


def test_profile_json_round_trip():
    for p in (_profile(), _profile(notes=()), measure("cpu", quick=True)):
        data = json.loads(p.to_json())
        again = HardwareProfile.from_dict(data)
        assert again == p
        assert isinstance(again.h2d[0], Point) and isinstance(again.gemm[0], GemmCurve)
        assert isinstance(again.notes, tuple) and isinstance(again.gemm[0].points, tuple)


# -- the cache ----------------------------------------------------------------------------------------------
def test_second_call_reads_the_cache(fake_measure, private_cache):
    first = hardware_profile("cpu", quick=True)
    assert fake_measure == [("cpu", True)]
    path = cache_path("cpu")
    assert path.parent == private_cache and path.exists()
    assert HardwareProfile.from_dict(json.loads(path.read_text())) == first
    second = hardware_profile("cpu")
    assert len(fake_measure) == 1 and second == first
    assert not list(private_cache.glob("*.tmp"))


def test_refresh_measures_again_and_rewrites(fake_measure):
    first = hardware_profile("cpu")
    again = hardware_profile("cpu", refresh=True)
    assert len(fake_measure) == 2 and again != first
    assert HardwareProfile.from_dict(json.loads(cache_path("cpu").read_text())) == again
    assert hardware_profile("cpu") == again and len(fake_measure) == 2


@pytest.mark.parametrize("content", ["{not json", "", "null", "[]", '{"device_type": "cpu"}',
                                     json.dumps({**json.loads(_profile().to_json()), "version": 0}),
                                     json.dumps({**json.loads(_profile().to_json()), "surprise": 1}),
                                     b"\xff\xfe\x00garbage"], ids=["truncated", "empty", "null", "list",
                                                                   "missing-fields", "old-version", "unknown-field",
                                                                   "not-utf8"])
def test_corrupt_or_outdated_cache_is_measured_again_and_rewritten(fake_measure, content):
    path = cache_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    got = hardware_profile("cpu")
    assert len(fake_measure) == 1
    cached = HardwareProfile.from_dict(json.loads(path.read_text()))
    assert cached == got and cached.version == PROFILE_VERSION
    assert hardware_profile("cpu") == got and len(fake_measure) == 1


def test_unwritable_cache_dir_still_returns_a_profile(fake_measure, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # mkdir under a file fails even for root
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(blocker))
    got = hardware_profile("cpu")
    assert isinstance(got, HardwareProfile) and len(fake_measure) == 1
    assert blocker.read_text() == "not a directory"
    hardware_profile("cpu")  # nothing cached: measured again, still no error
    assert len(fake_measure) == 2


def test_cache_file_is_keyed_by_device_driver_and_torch(private_cache, monkeypatch):
    name, driver = profiler._identity(torch.device("cpu"))
    path = cache_path("cpu")
    assert path.parent == private_cache and path.suffix == ".json"
    for part in (name, driver, torch.__version__):
        for word in re.findall(r"[A-Za-z0-9.]+", part):
            assert word in path.name, (word, path.name)
    assert re.fullmatch(r"[A-Za-z0-9.\-_]+\.json", path.name), path.name
    # Another GPU, driver or torch is another file.
    monkeypatch.setattr(profiler, "_identity", lambda device: ("NVIDIA H100 80GB HBM3", "550.54.15"))
    gpu_path = cache_path("cpu")
    assert gpu_path != path and "NVIDIA-H100-80GB-HBM3" in gpu_path.name and "550.54.15" in gpu_path.name
    monkeypatch.setattr(torch, "__version__", "9.9.9+test")
    assert cache_path("cpu") != gpu_path and "9.9.9" in cache_path("cpu").name


# -- the command line -----------------------------------------------------------------------------------------
def test_main_prints_the_table_and_the_cache_path(fake_measure, capsys):
    assert main(["--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out.splitlines()
    profile = hardware_profile("cpu")  # the one main cached
    assert len(fake_measure) == 1 and fake_measure[0] == ("cpu", True)
    rows = profile.rows()
    assert profile.device_name in out[0] and profile.torch_version in out[0]
    assert out[1].split() == ["what", "size", "measured"]
    for line, row in zip(out[2:2 + len(rows)], rows, strict=True):
        assert re.split(r"\s{2,}", line.strip()) == [cell for cell in row if cell], (line, row)
    assert out[-1] == f"cached in {cache_path('cpu')}"
    assert out == format_table(profile).splitlines() + [out[-1]]
    main(["--device", "cpu", "--refresh"])
    assert fake_measure[-1] == ("cpu", False) and len(fake_measure) == 2


def test_main_cuda_without_a_gpu_names_the_fix(monkeypatch, capsys, fake_measure):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        main(["--device", "cuda"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--device cpu" in err
    assert fake_measure == []  # refused before measuring
