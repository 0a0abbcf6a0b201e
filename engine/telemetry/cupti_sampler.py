"""Optional CUPTI PM sampling (L2 hit rate, PCIe and DRAM traffic, memory stalls every few ms) via cupti-python.

cupti-python (`pip install 'cupti-python>=13.4' nvidia-cuda-cupti`) is an optional extra: it is not in
requirements.txt and the GPU machines do not have it by default. `probe()` says whether PM sampling can run here
and, when it cannot, exactly why; `fallback` then names the committed Nsight Compute per-kernel results.

Which counters: the chip's single-pass sets and their members, read through cupti.profiler_host, decide
(engine/telemetry/pm_metrics.py); a chip without an L2 member says which sets it has and what is missing. The L2 hit
rate is averaged over the L2's two partitions, so the label of a run says what this device reads for an all-hit and
a DRAM-streaming loop, measured once per device (engine/telemetry/cupti_calibration.py) before the first run.

Cost: the hardware writes samples into its own buffer (256 MiB: far more than a run at 5 ms fills); nothing is
decoded on the engine's thread. A daemon thread drains the buffer every `decode_every_s` (2 s) in one batch and
evaluates the samples, handing the GIL back every few samples, so a Python-bound decode loop is not held up (each
decode also builds a CUPTI host object: rare batches keep that cost off the steps); the default interval is 5 ms (an
80 ms offloaded step still gets 16 samples). The sampler keeps a run's samples (`samples(since)` for live readers,
`stop()` for all); `stats` says what draining cost.

cupti-python API used (13.4): cupti.pm_sampling.Collector(device_index) enable/configure/start/decode/stop/disable,
its CounterData (len, [i] -> Sample(start_timestamp, end_timestamp, metric_values)); cupti.profiler_host
get_single_pass_sets, get_metrics_in_single_pass_set, get_num_of_passes, ProfilerHost(chip, PM_SAMPLING
[, single_pass_metric_set_name]) initialize/create_config_image/get_metric_properties/get_sub_metrics/deinitialize;
the chip name from the collector or cupti.cupti.device_get_chip_name. Tests drive all of it through a fake.
"""

from __future__ import annotations

import collections
import importlib
import itertools
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from engine.telemetry.cupti_calibration import (L2Calibration, calibrate, calibration_path, load_calibration,
                                                save_calibration)
from engine.telemetry.pm_metrics import (L2_ROLES, CounterChoice, choose_counters, cupti_counters, l2_formula,
                                         series_labels)

NCU_FALLBACK = "bench/results/decode_attention_ncu_h200.md"
DEFAULT_INTERVAL_US = 5000
MIN_INTERVAL_US, MAX_INTERVAL_US = 100, 100_000
INSTALL_HINT = "pip install 'cupti-python>=13.4' nvidia-cuda-cupti"
GIL_HANDBACK_SAMPLES = 16  # evaluate this many samples, then let the engine's thread run


@dataclass(frozen=True)
class CuptiProbe:
    """Whether PM sampling runs here, why not, and what it collects."""

    available: bool
    reason: str  # why it is unavailable, or what was chosen when it is available
    chip: str | None = None
    metrics: tuple[str, ...] = ()
    l2_formula: str | None = None  # the shown L2 figure in words; None when no L2 counter is sampled
    fallback: str | None = NCU_FALLBACK
    choice: CounterChoice | None = None  # the sets, the role of each metric, what is missing and why

    @property
    def l2_available(self) -> bool:
        return self.available and self.l2_formula is not None


@dataclass(frozen=True)
class CuptiSample:
    """One PM sample: its interval in the CUPTI clock domain (ns) and the metric values over it."""

    start_ns: int
    end_ns: int
    values: dict[str, float] = field(default_factory=dict)
    l2_hit_pct: float | None = None  # the shown L2 figure (the chosen L2 counter)


@dataclass
class DrainStats:
    """What draining cost and found (the sampler's thread CPU time is what could slow the engine's)."""

    decodes: int = 0
    samples: int = 0
    dropped: int = 0  # samples pushed out of the full ring
    drain_cpu_s: float = 0.0  # CPU time of the draining thread
    error: str | None = None  # set when draining failed; sampling then stops


@dataclass(frozen=True)
class PmRun:
    """A sampled run's counters as the record keeps them."""

    l2_hit_pct: float | None  # mean of the shown L2 figure over the run
    note: str  # what the L2 figure is, or why there is none
    counters: dict[str, list]  # engine.telemetry.pm_metrics.cupti_counters tracks
    labels: dict[str, str]  # track -> what its values are


class CuptiPmSampler:
    """PM sampling of one GPU. `importer` and `cuda_available` replace importlib/torch for tests; `calibrate`: run the
    L2 calibration before the first start when this device has none cached."""

    def __init__(self, device_index: int = 0, *, interval_us: int = DEFAULT_INTERVAL_US,
                 hardware_buffer_bytes: int = 256 << 20, decode_every_s: float = 2.0,
                 max_samples_per_decode: int = 4096, capacity_samples: int = 200_000, calibrate: bool = True,
                 importer: Callable[[str], ModuleType] | None = None,
                 cuda_available: Callable[[], bool] | None = None) -> None:
        if not MIN_INTERVAL_US <= interval_us <= MAX_INTERVAL_US:
            raise ValueError(f"interval_us={interval_us}: PM sampling here runs every {MIN_INTERVAL_US}.."
                             f"{MAX_INTERVAL_US} µs")
        self.device_index = device_index
        self.interval_us = interval_us
        self.hardware_buffer_bytes = hardware_buffer_bytes
        self.decode_every_s = decode_every_s
        self.max_samples_per_decode = max_samples_per_decode
        self.calibrate = calibrate
        self._import = importer or importlib.import_module
        self._cuda_available = cuda_available
        self._probe: CuptiProbe | None = None
        self._calibration: L2Calibration | None = None
        self._calibration_note = ""
        self._lock = threading.Lock()  # the collector is used by the draining thread and by stop()
        self._collector: Any = None
        self._eval_host: Any = None
        self._ring: collections.deque[CuptiSample] = collections.deque(maxlen=capacity_samples)
        self._num_samples = 0
        self._polled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = DrainStats()

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
        if self._cuda_available is None:  # PM sampling is enabled on a device whose context exists (CUPTI's samples)
            try:
                torch.empty(1, device=torch.device("cuda", self.device_index))
            except Exception as exc:  # noqa: BLE001
                return self._unavailable(f"no CUDA context on device {self.device_index}: {type(exc).__name__}: {exc}")
        try:
            pm = self._import("cupti.pm_sampling")
            ph = self._import("cupti.profiler_host")
            cupti_c = self._import("cupti.cupti")
        except Exception as exc:
            return self._unavailable(f"cupti-python lacks PM sampling (needs >= 13.4): {exc}")

        collector = pm.Collector(device_index=self.device_index)
        try:
            collector.enable()
        except PermissionError as exc:
            return self._unavailable(f"no permission for GPU performance counters ({exc}): run as root or set "
                                     "NVreg_RestrictProfilingToAdminUsers=0")
        except Exception as exc:
            return self._unavailable(f"PM sampling could not be enabled: {type(exc).__name__}: {exc}")
        chip = None
        try:
            chip = self._chip_name(cupti_c, collector)
            sets, sets_note = self._single_pass_sets(ph, chip)
            choice = choose_counters(chip, sets, self._accepts(ph, chip), submetrics=self._submetrics(ph, chip))
            if sets_note:
                choice = _with_missing(choice, sets_note)
            if not choice.metrics:
                return self._unavailable(f"counters refused on {chip}: " + "; ".join(choice.missing), chip=chip,
                                         choice=choice)
            # The real gate: the chosen set must configure on this device. Refused: drop the last counter and retry.
            metrics, refused = list(choice.metrics), []
            while True:
                try:
                    self._configure(collector, pm, metrics, choice)
                    break
                except Exception as exc:
                    refused.append(f"{metrics[-1]} ({type(exc).__name__}: {exc})")
                    metrics.pop()
                    if not metrics:
                        return self._unavailable(f"counters refused on {chip} by configure: {'; '.join(refused)}",
                                                 chip=chip, choice=choice)
            if refused:
                choice = _kept(choice, metrics, f"configure refused {'; '.join(refused)}")
        except Exception as exc:
            return self._unavailable(f"counters refused: {type(exc).__name__}: {exc}", chip=chip)
        finally:
            try:
                collector.disable()
            except Exception:  # best effort: probing must leave nothing enabled, but never raise
                pass
        formula = l2_formula(choice)
        missing = f"; not sampled: {'; '.join(choice.missing)}" if choice.missing else ""
        return CuptiProbe(available=True, reason=f"PM sampling on {chip} every {self.interval_us / 1000:g} ms: "
                          f"{', '.join(choice.metrics)}; L2 = {formula or 'not available'}{missing}",
                          chip=chip, metrics=choice.metrics, l2_formula=formula, fallback=None, choice=choice)

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
    def _single_pass_sets(ph: Any, chip: str) -> tuple[dict[str, list[str]] | None, str]:
        """{set: members} as the chip lists them (None when this cupti-python cannot list sets), and a note on
        sets that could not be read."""
        get_sets = getattr(ph, "get_single_pass_sets", None)
        get_members = getattr(ph, "get_metrics_in_single_pass_set", None)
        if get_sets is None or get_members is None:
            return None, ""
        try:
            names = list(get_sets(chip))
        except Exception as exc:  # noqa: BLE001 - e.g. a chip this CUPTI does not support
            return {}, f"single-pass sets of {chip} could not be listed ({type(exc).__name__}: {exc})"
        sets, unread = {}, []
        for name in names:
            try:
                sets[name] = list(get_members(chip, name))
            except Exception as exc:  # noqa: BLE001
                unread.append(f"{name} ({type(exc).__name__}: {exc})")
        return sets, (f"members of set(s) {', '.join(unread)} could not be read" if unread else "")

    @staticmethod
    def _host(ph: Any, chip: str, set_name: str | None) -> Any:
        if set_name:
            return ph.ProfilerHost(chip, ph.ProfilerType.PM_SAMPLING, single_pass_metric_set_name=set_name)
        return ph.ProfilerHost(chip, ph.ProfilerType.PM_SAMPLING)

    def _accepts(self, ph: Any, chip: str) -> Callable[[Sequence[str], str | None], bool]:
        count_passes = getattr(ph, "get_num_of_passes", None)

        def accepts(metrics: Sequence[str], set_name: str | None) -> bool:
            # A fresh host per question: after CUPTI refuses one metric, the host that asked answers no more.
            host = self._host(ph, chip, set_name)
            try:
                host.initialize()
                image = host.create_config_image(metrics=list(metrics))
                return count_passes is None or count_passes(image) == 1
            except Exception:  # a metric this chip does not know, or one PM sampling cannot collect
                return False
            finally:
                try:
                    host.deinitialize()
                except Exception:  # noqa: BLE001
                    pass

        return accepts

    def _submetrics(self, ph: Any, chip: str) -> Callable[[str], Sequence[str] | None]:
        def submetrics(name: str) -> Sequence[str] | None:
            host = self._host(ph, chip, None)
            try:
                host.initialize()
                kind = host.get_metric_properties(name).metric_type
                return list(host.get_sub_metrics(name, kind))
            except Exception:  # noqa: BLE001 - the chip does not say: the kind's usual sub-metrics are tried
                return None
            finally:
                try:
                    host.deinitialize()
                except Exception:  # noqa: BLE001
                    pass

        return submetrics

    def _configure(self, collector: Any, pm: Any, metrics: Sequence[str], choice: CounterChoice) -> None:
        extra = {"single_pass_metric_set_name": choice.set_name} if choice.use_set_name and choice.set_name else {}
        collector.configure(metrics=list(metrics), hardware_buffer_size=self.hardware_buffer_bytes,
                            sampling_interval=self.interval_us * 1000,
                            trigger_mode=pm.TriggerMode.GPU_TIME_INTERVAL, **extra)

    # ---- calibration --------------------------------------------------------------------------------

    def calibration(self, *, refresh: bool = False, device_name: str | None = None) -> L2Calibration | None:
        """What this device's L2 counters read for an all-hit and a DRAM-streaming loop: cached per device, measured
        (about a second of GPU time, with the device otherwise idle) when missing. None, with `calibration_note`
        saying why, where there is no L2 counter or the measurement failed."""
        probe = self.probe()
        choice = probe.choice
        if not probe.l2_available or choice is None:
            self._calibration_note = "no L2 counter to calibrate"
            return None
        l2_metrics = [choice.roles[r] for r in L2_ROLES if r in choice.roles]
        if self._calibration is not None and not refresh and all(self._calibration.figures(m) for m in l2_metrics):
            return self._calibration
        try:
            import torch

            name = device_name or torch.cuda.get_device_name(self.device_index)
            path = calibration_path(name, f"cuda {torch.version.cuda}", probe.chip or "?")
            cached = None if refresh else load_calibration(path)
            if cached is not None and all(cached.figures(m) for m in l2_metrics):
                self._calibration = cached
                return cached
            if self._collector is not None:
                raise RuntimeError("the sampler is running")
            measured = calibrate(self.sample_during, device=torch.device("cuda", self.device_index),
                                 device_name=name, chip=probe.chip or "?", metrics=l2_metrics,
                                 interval_us=self.interval_us)
            save_calibration(measured, path)
            self._calibration = measured
            self._calibration_note = measured.note
            return measured
        except Exception as exc:  # noqa: BLE001 - a run goes on without the calibration; its label says so
            self._calibration_note = f"calibration failed: {type(exc).__name__}: {exc}"
            return None

    @property
    def calibration_note(self) -> str:
        return self._calibration_note

    def sample_during(self, fn: Callable[[], None]) -> list[CuptiSample]:
        """Sample the chosen counters while `fn()` runs (the device synchronised by fn): every sample, decoded.
        Not while a run is sampled (one PM-sampling session per device)."""
        if self._collector is not None:
            raise RuntimeError("CUPTI PM sampling is already running on this device (a profiling run): try after it")
        self._open()
        try:
            fn()
        finally:
            self._close()
        return list(self._ring)

    # ---- sampling -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Enable, configure and start PM sampling, and the draining thread; calibrate first (once per device) when
        asked to. Raises RuntimeError naming the reason if unavailable."""
        probe = self.probe()
        if not probe.available:
            raise RuntimeError(f"CUPTI PM sampling is unavailable: {probe.reason}")
        if self._collector is not None:
            return
        if self.calibrate and probe.l2_available:
            self.calibration()
        self._open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._drain_loop, name="kvlab-cupti", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        probe = self.probe()
        assert probe.choice is not None
        pm = self._import("cupti.pm_sampling")
        collector = pm.Collector(device_index=self.device_index)
        collector.enable()
        try:
            self._configure(collector, pm, probe.metrics, probe.choice)
            self._eval_host = self._evaluation_host(probe)
            collector.start()
        except Exception:
            collector.disable()
            self._release_eval_host()
            raise
        with self._lock:
            self._ring.clear()
            self._num_samples = self._polled = 0
            self.stats = DrainStats()
            self._collector = collector

    def _evaluation_host(self, probe: CuptiProbe) -> Any:
        # CounterData evaluates on a host made without a set name; names that need one get a host of their own.
        choice = probe.choice
        if choice is None or not (choice.use_set_name and choice.set_name):
            return None
        host = self._host(self._import("cupti.profiler_host"), probe.chip, choice.set_name)
        host.initialize()
        return host

    def _release_eval_host(self) -> None:
        host, self._eval_host = self._eval_host, None
        if host is not None:
            try:
                host.deinitialize()
            except Exception:  # noqa: BLE001
                pass

    def _drain_loop(self) -> None:
        while not self._stop.wait(self.decode_every_s):
            try:
                with self._lock:
                    self._drain()
            except Exception as exc:  # noqa: BLE001 - reported in stats; the run goes on without more samples
                self.stats.error = f"{type(exc).__name__}: {exc}"
                return

    def _drain(self) -> None:
        # Caller holds self._lock. Decode everything the hardware buffer holds, in batches of max_samples_per_decode.
        collector = self._collector
        if collector is None:
            return
        t0 = time.thread_time()
        metrics = self.probe().metrics
        l2_index = self._l2_index()
        for _ in range(64):
            data = collector.decode(max_samples=self.max_samples_per_decode)
            count = len(data)
            self.stats.decodes += 1
            for i in range(count):
                if i % GIL_HANDBACK_SAMPLES == GIL_HANDBACK_SAMPLES - 1:
                    time.sleep(0)  # hand the GIL back: the engine's thread may be waiting to launch
                start_ns, end_ns, raw = self._evaluate(data, i)
                if not start_ns:  # the first sample of a session has no start time
                    continue
                values = {m: float(v) for m, v in zip(metrics, raw)}
                pct = float(raw[l2_index]) if l2_index is not None and l2_index < len(raw) else None
                if len(self._ring) == self._ring.maxlen:
                    self.stats.dropped += 1
                self._ring.append(CuptiSample(start_ns=int(start_ns), end_ns=int(end_ns), values=values,
                                              l2_hit_pct=pct if pct is not None and math.isfinite(pct) else None))
                self._num_samples += 1
                self.stats.samples += 1
            if count < self.max_samples_per_decode:
                break
        self.stats.drain_cpu_s += time.thread_time() - t0

    def _evaluate(self, data: Any, index: int) -> tuple[int, int, Sequence[float]]:
        host = self._eval_host
        if host is None:
            sample = data[index]
            return sample.start_timestamp, sample.end_timestamp, sample.metric_values
        values = host.evaluate_metric_values(counter_data_image=data._image, metrics=list(data.metrics), index=index)
        return data._start_timestamps[index], data._end_timestamps[index], list(values)

    def _l2_index(self) -> int | None:
        probe = self.probe()
        metric = probe.choice.l2_metric if probe.choice is not None else None
        return probe.metrics.index(metric) if metric in probe.metrics else None

    def samples(self, since: int = 0) -> tuple[list[CuptiSample], int]:
        """Samples decoded so far at index >= `since` still kept, and the index to pass next time (live readers)."""
        with self._lock:
            first = self._num_samples - len(self._ring)
            count = self._num_samples - max(since, first)
            out = list(itertools.islice(reversed(self._ring), max(0, count)))
            out.reverse()
            return out, self._num_samples

    def poll(self) -> list[CuptiSample]:
        """The samples decoded since the last poll (the draining thread decodes; this only reads)."""
        if self._collector is None:
            return []
        out, self._polled = self.samples(self._polled)
        return out

    def _close(self) -> None:
        with self._lock:
            collector = self._collector
            if collector is None:
                return
            try:
                collector.stop()
                self._drain()
            finally:
                self._collector = None
                try:
                    collector.disable()
                finally:
                    self._release_eval_host()

    def stop(self) -> list[CuptiSample]:
        """Stop sampling, decode what is left, release the collector: every sample of the run, oldest first."""
        if self._collector is None:
            return []
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        self._close()
        with self._lock:
            return list(self._ring)

    # ---- what a run's samples say -------------------------------------------------------------------

    def run_result(self, samples: Sequence[CuptiSample], *, origin_wall_ns: int) -> PmRun:
        """The record's view of a run's samples: mean L2 %, the note saying what it is, tracks and their labels."""
        probe = self.probe()
        counters = cupti_counters(samples, origin_wall_ns=origin_wall_ns)
        labels = series_labels(probe.choice, interval_us=self.interval_us, calibration=self._calibration) \
            if probe.choice is not None else {}
        values = [s.l2_hit_pct for s in samples if s.l2_hit_pct is not None]
        every = f"{len(samples)} samples, every {self.interval_us / 1000:g} ms"
        if self.stats.error:
            every += f"; a decode mid-run failed ({self.stats.error}), the rest were decoded when sampling stopped"
        if not values:
            why = "; ".join(probe.choice.missing) if probe.choice is not None and probe.choice.missing else \
                "no L2 samples"
            return PmRun(None, f"CUPTI PM sampled {', '.join(probe.metrics)} ({every}) but no L2 hit rate: {why}; L2 "
                         f"figures: see {NCU_FALLBACK}", counters, labels)
        mean = statistics.fmean(values)
        label = labels.get("L2 hit %", probe.l2_formula or "")
        return PmRun(mean, f"L2 hit {mean:.1f} % mean of {len(values)} CUPTI PM samples ({every}): {label}", counters,
                     labels)


def _with_missing(choice: CounterChoice, line: str) -> CounterChoice:
    return CounterChoice(chip=choice.chip, sets=choice.sets, set_name=choice.set_name, metrics=choice.metrics,
                         roles=choice.roles, missing=(*choice.missing, line), use_set_name=choice.use_set_name)


def _kept(choice: CounterChoice, metrics: Sequence[str], line: str) -> CounterChoice:
    """`choice` narrowed to `metrics` (what configure took), the rest said in `missing`."""
    kept = set(metrics)
    roles = {role: name for role, name in choice.roles.items() if name in kept}
    return CounterChoice(chip=choice.chip, sets=choice.sets, set_name=choice.set_name if roles.keys() & set(L2_ROLES)
                         else None, metrics=tuple(metrics), roles=roles, missing=(*choice.missing, line),
                         use_set_name=choice.use_set_name)


__all__ = ["DEFAULT_INTERVAL_US", "NCU_FALLBACK", "CuptiProbe", "CuptiPmSampler", "CuptiSample", "DrainStats",
           "PmRun"]
