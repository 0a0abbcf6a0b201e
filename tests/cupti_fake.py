"""A stand-in for cupti-python 13.4's modules (cupti, cupti.pm_sampling, cupti.profiler_host, cupti.cupti), with the
single-pass sets and one-pass rules of a recorded chip, and a collector that produces samples on a fake clock.

    fake = FakeCupti(sets=GH100_SETS)
    sampler = CuptiPmSampler(importer=fake.importer, cuda_available=lambda: True, calibrate=False)
    fake.workload = {"l2": 47.0}; fake.advance_ms(20)   # 20 ms of samples at the configured interval
"""

from __future__ import annotations

import math
from types import SimpleNamespace

# Recorded on an H200 (GH100, cupti-python 13.4, nvidia-cuda-cupti 13.5; 2026-12-01): the set and the members the
# issue names (the chip lists more; these are the ones the counter choice looks at, plus neighbours).
GH100_SETS = {"TriageCompute": [
    "LTS.TriageCompute.lts__average_t_sector_hit_rate_realtime",
    "LTS.TriageCompute.lts__average_t_sector_hit_rate_srcunit_tex_realtime",
    "dramc__read_throughput",
    "l1tex__t_sector_hit_rate",
    "smsp__warps_issue_stalled_long_scoreboard",
    "lts__t_sectors_srcunit_tex",
    "sm__throughput",
    "gpu__time_duration",
]}
# A chip whose single-pass sets name no L2 hit rate.
NO_L2_SETS = {"TriageCompute": ["dramc__read_throughput", "sm__throughput", "smsp__warps_issue_stalled_long_scoreboard"],
              "Graphics": ["gr__cycles_active", "pcie__read_bytes"]}


def gh100_accepts(metrics, set_name=None, *, max_per_pass: int = 7) -> bool:
    """GH100's answers as measured: set-prefixed names take .pct/.ratio only; the bare lookup-hit counters and names
    outside the sets are refused; the L2 realtime rates, PCIe bytes and L2 sectors fit one pass together."""
    ok_plain = {"pcie__read_bytes.sum", "pcie__write_bytes.sum", "lts__t_sectors_srcunit_tex.sum",
                "dramc__read_throughput.avg.pct_of_peak_sustained_elapsed",
                "smsp__warps_issue_stalled_long_scoreboard.avg.per_cycle_active", "dram__bytes_read.sum"}
    for m in metrics:
        if m.startswith("LTS.TriageCompute."):
            if not (m.endswith(".pct") or m.endswith(".ratio")):
                return False
        elif m not in ok_plain:
            return False
    return len(metrics) <= max_per_pass


class FakeCupti:
    """The modules and the state behind them. `calls` records what the sampler asked, in order."""

    def __init__(self, *, chip: str = "GH100", sets=GH100_SETS, accepts=gh100_accepts, list_sets: bool = True,
                 enable_error: Exception | None = None, configure_error=None, submetrics=None,
                 origin_ns: int = 1_795_580_768_000_000_000) -> None:
        self.chip, self.sets, self.accepts = chip, sets, accepts
        self.enable_error, self.configure_error, self.submetrics = enable_error, configure_error, submetrics
        self.calls: list = []
        self.now_ns = origin_ns
        self.workload = {"l2": 40.0, "l2_all": 38.0, "pcie_read_gb_s": 50.0, "dram_pct": 60.0, "stall": 3.0}
        self.active = None  # the started collector
        self.enabled = 0
        self.modules = self._modules(list_sets)

    def importer(self, name: str):
        return self.modules[name]

    def advance_ms(self, ms: float) -> None:
        """Let `ms` pass; the started collector records a sample per interval."""
        collector = self.active
        end = self.now_ns + int(ms * 1e6)
        if collector is None:
            self.now_ns = end
            return
        step = collector.interval_ns
        while collector.next_ns + step <= end:
            start = collector.next_ns
            collector.pending.append((0 if collector.first else start, start + step, self.values(collector.metrics, step)))
            collector.first = False
            collector.next_ns += step
        self.now_ns = end

    def values(self, metrics, dur_ns):
        w = self.workload
        out = []
        for m in metrics:
            if "srcunit_tex_realtime" in m:
                out.append(w["l2"])
            elif "hit_rate_realtime" in m:
                out.append(w["l2_all"])
            elif m.startswith("pcie__read"):
                out.append(w["pcie_read_gb_s"] * dur_ns)  # bytes: GB/s x ns
            elif m.startswith("pcie__write"):
                out.append(w["pcie_read_gb_s"] * dur_ns / 10)
            elif m.startswith("dramc__read_throughput"):
                out.append(w["dram_pct"])
            elif m.startswith("smsp__warps_issue_stalled"):
                out.append(w["stall"])
            elif m.startswith("lts__t_sectors_srcunit_tex"):
                out.append(1e3 * dur_ns / 32)  # 1000 GB/s of sectors
            else:
                out.append(math.nan)
        return out

    def _modules(self, list_sets: bool):
        fake = self

        class CounterData:
            def __init__(self, samples, metrics):
                self._samples, self.metrics = samples, metrics
                self.num_completed_samples = len(samples)

            def __len__(self):
                return len(self._samples)

            def __getitem__(self, i):
                start, end, values = self._samples[i]
                return SimpleNamespace(start_timestamp=start, end_timestamp=end, metric_values=list(values))

        class Collector:
            def __init__(self, device_index=0):
                fake.calls.append(("collector", device_index))
                self._chip_name = None
                self.pending, self.metrics, self.first = [], [], True

            def enable(self):
                if fake.enable_error is not None:
                    raise fake.enable_error
                if fake.enabled:
                    raise RuntimeError("PM sampling is already enabled on this device.")
                fake.enabled += 1
                self._chip_name = fake.chip
                fake.calls.append("enable")

            def configure(self, *, metrics, hardware_buffer_size, sampling_interval, trigger_mode, **extra):
                error = fake.configure_error(metrics) if callable(fake.configure_error) else fake.configure_error
                if error is not None:
                    raise error
                if not fake.accepts(list(metrics), extra.get("single_pass_metric_set_name")):
                    raise ValueError("Requested PM sampling configuration is not supported.")
                self.metrics, self.interval_ns = list(metrics), sampling_interval
                fake.calls.append(("configure", dict(metrics=list(metrics), sampling_interval=sampling_interval,
                                                     hardware_buffer_size=hardware_buffer_size, **extra)))

            def start(self):
                self.next_ns, self.first = fake.now_ns, True
                fake.active = self
                fake.calls.append("start")

            def stop(self):
                fake.active = None
                fake.calls.append("stop")

            def decode(self, max_samples=10000):
                taken, self.pending = self.pending[:max_samples], self.pending[max_samples:]
                fake.calls.append(("decode", len(taken)))
                return CounterData(taken, self.metrics)

            def disable(self):
                if self._chip_name is not None:
                    fake.enabled -= 1
                self._chip_name = None
                fake.calls.append("disable")

        class ProfilerHost:
            def __init__(self, chip, profiler_type, single_pass_metric_set_name=None):
                assert (chip, profiler_type) == (fake.chip, "pm"), (chip, profiler_type)
                self.set_name = single_pass_metric_set_name

            def initialize(self):
                fake.calls.append("host-init")

            def create_config_image(self, metrics):
                if not fake.accepts(list(metrics), self.set_name):
                    raise ValueError("One or more metrics are invalid or not supported")
                return tuple(metrics)

            def get_metric_properties(self, name):
                if fake.submetrics is None or name not in fake.submetrics:
                    raise ValueError(f"Metric {name!r} is invalid")
                return SimpleNamespace(metric_type="kind")

            def get_sub_metrics(self, name, kind):
                return list(fake.submetrics[name])

            def deinitialize(self):
                fake.calls.append("host-deinit")

        class ChipParams:
            @property
            def ptr(self):
                return self

        def device_get_chip_name(params):
            params.p_chip_name = fake.chip

        profiler_host = SimpleNamespace(ProfilerHost=ProfilerHost, ProfilerType=SimpleNamespace(PM_SAMPLING="pm"),
                                        get_num_of_passes=lambda image: 1)
        if list_sets:
            profiler_host.get_single_pass_sets = lambda chip: list(fake.sets)
            profiler_host.get_metrics_in_single_pass_set = lambda chip, name: list(fake.sets[name])
        modules = {
            "cupti": SimpleNamespace(),
            "cupti.pm_sampling": SimpleNamespace(Collector=Collector,
                                                 TriggerMode=SimpleNamespace(GPU_TIME_INTERVAL="time")),
            "cupti.profiler_host": profiler_host,
            "cupti.cupti": SimpleNamespace(DeviceGetChipNameParams=ChipParams, DEVICE_GET_CHIP_NAME_PARAMS_STRUCT_SIZE=24,
                                           device_get_chip_name=device_get_chip_name),
        }
        profiler_host.get_supported_chips = lambda: [fake.chip]
        for name in ("pm_sampling", "profiler_host", "cupti"):  # `import cupti.profiler_host as ph` reads these
            setattr(modules["cupti"], name, modules[f"cupti.{name}"])
        return modules
