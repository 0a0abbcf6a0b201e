"""Optional CUPTI PM sampling (L2 hit rate, DRAM and PCIe bytes every ≤ 1 ms) via cupti-python.

cupti-python (`pip install 'cupti-python>=13.3' nvidia-cuda-cupti`) is an optional extra: it is not in
requirements.txt and the GPU machines do not have it by default. `probe()` says whether PM sampling can
run here and, when it cannot, exactly why; `fallback` then names the committed Nsight Compute per-kernel
results, which hold the same L2 counters for the decode-attention kernel.

Which counters: the chip is asked which of WANTED_METRICS fit one PM-sampling pass before any is chosen
(on an H100 `lts__t_sector_hit_rate` was refused in one configuration). On H100 a plain L2 hit rate
understates L2 service, since about half the hits land in the far partition, so the L2 figure is
(tex lookup hits + ltcfabric lookup hits) / tex reads where those counters fit, and the plain sector hit
rate otherwise; `l2_formula` says which one is shown.

Cupti-python API used (13.3): cupti.pm_sampling.Collector(device_index) with enable/configure/start/
decode/stop/disable, cupti.profiler_host.ProfilerHost(chip, ProfilerType.PM_SAMPLING) with
initialize/create_config_image/deinitialize and cupti.profiler_host.get_num_of_passes, and the chip name
from cupti.cupti.device_get_chip_name. Only the unavailable paths are tested on CPU machines.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

TEX_READS = "lts__t_sectors_srcunit_tex_op_read.sum"
TEX_LOOKUP_HITS = "lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum"
FABRIC_LOOKUP_HITS = "lts__t_sectors_srcunit_ltcfabric_op_read_lookup_hit.sum"
SECTOR_HIT_RATE = "lts__t_sector_hit_rate.pct"
WANTED_METRICS: tuple[str, ...] = (SECTOR_HIT_RATE, TEX_READS, TEX_LOOKUP_HITS, FABRIC_LOOKUP_HITS,
                                   "dram__bytes_read.sum", "pcie__read_bytes.sum", "pcie__write_bytes.sum")
L2_SERVED_METRICS: tuple[str, ...] = (TEX_READS, TEX_LOOKUP_HITS, FABRIC_LOOKUP_HITS)
L2_FORMULA_SERVED = "(tex lookup hits + ltcfabric lookup hits) / tex reads"
L2_FORMULA_PLAIN = "lts__t_sector_hit_rate"
# Read lookups of every source (SM and the other partition's fabric requests): a plain read hit rate, for chips
# that take neither the served trio nor the sector hit rate in one pass.
ALL_READS = "lts__t_sectors_op_read.sum"
ALL_READ_HITS = "lts__t_sectors_op_read_lookup_hit.sum"
L2_FORMULA_READS = "lts read lookup hits / lts reads (all sources)"
NCU_FALLBACK = "bench/results/decode_attention_ncu.md"
MAX_INTERVAL_US = 1000
INSTALL_HINT = "pip install 'cupti-python>=13.3' nvidia-cuda-cupti"


def choose_metrics(accepts: Callable[[Sequence[str]], bool]) -> tuple[tuple[str, ...], str | None]:
    """The metrics to sample and the L2 formula they allow, given `accepts(metrics)`: whether the chip
    takes that whole set in one pass. Order of preference: the L2-served trio, PCIe read/write, DRAM
    read bytes; the plain sector hit rate only when the trio does not fit."""
    chosen: list[str] = []
    formula = None
    if accepts(L2_SERVED_METRICS):
        chosen += L2_SERVED_METRICS
        formula = L2_FORMULA_SERVED
    for metric in ("pcie__read_bytes.sum", "pcie__write_bytes.sum", "dram__bytes_read.sum"):
        if accepts([*chosen, metric]):
            chosen.append(metric)
    if formula is None and accepts([*chosen, SECTOR_HIT_RATE]):
        chosen.append(SECTOR_HIT_RATE)
        formula = L2_FORMULA_PLAIN
    if formula is None and accepts([*chosen, ALL_READS, ALL_READ_HITS]):
        chosen += [ALL_READS, ALL_READ_HITS]
        formula = L2_FORMULA_READS
    return tuple(chosen), formula


def l2_hit_pct(values: Mapping[str, float], formula: str | None) -> float | None:
    """The L2 percentage `formula` defines, from one sample's metric values; None when not computable."""
    if formula == L2_FORMULA_SERVED:
        reads = values.get(TEX_READS, 0.0)
        if reads <= 0:
            return None
        return 100.0 * (values.get(TEX_LOOKUP_HITS, 0.0) + values.get(FABRIC_LOOKUP_HITS, 0.0)) / reads
    if formula == L2_FORMULA_PLAIN:
        return values.get(SECTOR_HIT_RATE)
    if formula == L2_FORMULA_READS:
        reads = values.get(ALL_READS, 0.0)
        return 100.0 * values.get(ALL_READ_HITS, 0.0) / reads if reads > 0 else None
    return None


@dataclass(frozen=True)
class CuptiProbe:
    """Whether PM sampling runs here, why not, and what it would collect."""

    available: bool
    reason: str  # why it is unavailable, or what was chosen when it is available
    chip: str | None = None
    metrics: tuple[str, ...] = ()
    l2_formula: str | None = None
    fallback: str | None = NCU_FALLBACK


@dataclass(frozen=True)
class CuptiSample:
    """One PM sample: its interval in the CUPTI clock domain (ns) and the metric values over it."""

    start_ns: int
    end_ns: int
    values: dict[str, float] = field(default_factory=dict)
    l2_hit_pct: float | None = None


class CuptiPmSampler:
    """PM sampling of one GPU. `importer` and `cuda_available` replace importlib/torch for tests."""

    def __init__(self, device_index: int = 0, *, interval_us: int = MAX_INTERVAL_US,
                 hardware_buffer_bytes: int = 256 << 20, max_samples: int = 20_000,
                 importer: Callable[[str], ModuleType] | None = None,
                 cuda_available: Callable[[], bool] | None = None) -> None:
        if not 0 < interval_us <= MAX_INTERVAL_US:
            raise ValueError(f"interval_us={interval_us}: PM sampling here runs every 1..{MAX_INTERVAL_US} µs")
        self.device_index = device_index
        self.interval_us = interval_us
        self.hardware_buffer_bytes = hardware_buffer_bytes
        self.max_samples = max_samples
        self._import = importer or importlib.import_module
        self._cuda_available = cuda_available
        self._probe: CuptiProbe | None = None
        self._collector: Any = None

    # ---- availability -------------------------------------------------------------------------------

    def probe(self) -> CuptiProbe:
        """Check (once) that cupti-python, a GPU, the permission and the counters are all there."""
        if self._probe is None:
            self._probe = self._run_probe()
        return self._probe

    @property
    def why_unavailable(self) -> str | None:
        probe = self.probe()
        return None if probe.available else probe.reason

    @property
    def fallback(self) -> str | None:
        """Where L2 figures come from when PM sampling cannot run: the committed ncu results."""
        probe = self.probe()
        return None if probe.available else probe.fallback

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.probe().metrics

    @property
    def l2_formula(self) -> str | None:
        return self.probe().l2_formula

    def _unavailable(self, reason: str, **known: Any) -> CuptiProbe:
        return CuptiProbe(available=False, reason=f"{reason}; L2 figures: see {NCU_FALLBACK} (Nsight Compute)",
                          **known)

    def _run_probe(self) -> CuptiProbe:
        try:
            self._import("cupti")
        except ImportError:
            return self._unavailable(f"cupti-python not installed (optional extra: {INSTALL_HINT})")
        except Exception as exc:  # installed but libcupti could not be loaded
            return self._unavailable(f"cupti-python could not load: {type(exc).__name__}: {exc}")
        cuda_available = self._cuda_available
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available
        if not cuda_available():
            return self._unavailable("no GPU: CUDA reports no device on this machine")
        try:
            pm = self._import("cupti.pm_sampling")
            ph = self._import("cupti.profiler_host")
            cupti_c = self._import("cupti.cupti")
        except Exception as exc:
            return self._unavailable(f"cupti-python lacks PM sampling (needs >= 13.3): {exc}")

        collector = pm.Collector(device_index=self.device_index)
        try:
            collector.enable()
        except PermissionError as exc:
            return self._unavailable(f"no permission for GPU performance counters ({exc}): run as root or set "
                                     "NVreg_RestrictProfilingToAdminUsers=0")
        except Exception as exc:
            return self._unavailable(f"PM sampling could not be enabled: {type(exc).__name__}: {exc}")
        try:
            chip = self._chip_name(cupti_c, collector)
            metrics, formula = self._choose_on_chip(ph, chip)
            if not metrics:
                return self._unavailable(f"counters refused: none of {', '.join(WANTED_METRICS)} fits one PM "
                                         f"sampling pass on {chip}", chip=chip)
            # The real gate: the chosen set must configure on this device.
            collector.configure(metrics=list(metrics), hardware_buffer_size=self.hardware_buffer_bytes,
                                sampling_interval=self.interval_us * 1000,
                                trigger_mode=pm.TriggerMode.GPU_TIME_INTERVAL)
        except Exception as exc:
            return self._unavailable(f"counters refused: {type(exc).__name__}: {exc}")
        finally:
            try:
                collector.disable()
            except Exception:  # best effort: probing must leave nothing enabled, but never raise
                pass
        return CuptiProbe(available=True, reason=f"PM sampling on {chip} every {self.interval_us} µs: "
                          f"{', '.join(metrics)}; L2 = {formula or 'not available'}",
                          chip=chip, metrics=metrics, l2_formula=formula, fallback=None)

    def _chip_name(self, cupti_c: Any, collector: Any = None) -> str:
        """The chip's name ("GH100"): what an enabled collector resolved, else asked of CUPTI directly."""
        name = getattr(collector, "_chip_name", None)
        if not name:
            params = cupti_c.DeviceGetChipNameParams()
            params.struct_size = cupti_c.DEVICE_GET_CHIP_NAME_PARAMS_STRUCT_SIZE
            params.device_index = self.device_index
            cupti_c.device_get_chip_name(params.ptr)
            name = params.p_chip_name
        return name.decode() if isinstance(name, bytes) else str(name)

    @staticmethod
    def _choose_on_chip(ph: Any, chip: str) -> tuple[tuple[str, ...], str | None]:
        count_passes = getattr(ph, "get_num_of_passes", None)

        def accepts(metrics: Sequence[str]) -> bool:
            # A fresh host per question: after CUPTI refuses one metric, the host that asked answers no more.
            host = ph.ProfilerHost(chip, ph.ProfilerType.PM_SAMPLING)
            host.initialize()
            try:
                image = host.create_config_image(metrics=list(metrics))
                # Without a pass counter, configure() in the probe is what enforces a single pass.
                return count_passes is None or count_passes(image) == 1
            except Exception:  # a metric this chip does not know, or one PM sampling cannot collect
                return False
            finally:
                host.deinitialize()

        return choose_metrics(accepts)

    # ---- sampling -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Enable, configure and start PM sampling; raises RuntimeError naming the reason if unavailable."""
        probe = self.probe()
        if not probe.available:
            raise RuntimeError(f"CUPTI PM sampling is unavailable: {probe.reason}")
        if self._collector is not None:
            return
        pm = self._import("cupti.pm_sampling")
        collector = pm.Collector(device_index=self.device_index)
        collector.enable()
        try:
            collector.configure(metrics=list(probe.metrics), hardware_buffer_size=self.hardware_buffer_bytes,
                                sampling_interval=self.interval_us * 1000,
                                trigger_mode=pm.TriggerMode.GPU_TIME_INTERVAL)
            collector.start()
        except Exception:
            collector.disable()
            raise
        self._collector = collector

    def poll(self) -> list[CuptiSample]:
        """Decode what the hardware buffer holds so far (call from a non-engine thread)."""
        return self._decode() if self._collector is not None else []

    def stop(self) -> list[CuptiSample]:
        """Stop sampling, return the last decoded samples, release the collector."""
        collector = self._collector
        if collector is None:
            return []
        self._collector = None
        try:
            collector.stop()
            return self._decode(collector)
        finally:
            collector.disable()

    def _decode(self, collector: Any = None) -> list[CuptiSample]:
        collector = collector or self._collector
        probe = self.probe()
        data = collector.decode(max_samples=self.max_samples)
        out = []
        for i in range(data.num_completed_samples):
            sample = data[i]
            if not sample.start_timestamp:  # the first sample of a session has no start time
                continue
            values = {m: float(v) for m, v in zip(probe.metrics, sample.metric_values)}
            out.append(CuptiSample(start_ns=int(sample.start_timestamp), end_ns=int(sample.end_timestamp),
                                   values=values, l2_hit_pct=l2_hit_pct(values, probe.l2_formula)))
        return out
