"""NVML sampler: PCIe link bytes, utilisation, memory and SM clock on a daemon thread.

PCIe bytes come from the field counters NVML_FI_DEV_PCIE_COUNT_TX/RX_BYTES: cheap to read, but 32-bit,
so they wrap every ~78 ms at full H100 PCIe speed. They are sampled every `period_s` (20 ms by default)
and unwrapped into 64-bit running totals; consecutive totals give "link" GB/s (protocol bytes included,
~8 % above the engine's payload). `nvmlDeviceGetPcieThroughput` is never called: it blocks ~20 ms.
TX is what the GPU sent (D2H), RX what it received (H2D).

Timestamps are µs since `time_origin_ns` (a `time.perf_counter_ns()` value; pass a Recorder's
`origin_ns` to put samples on the recorder's axis). Nothing here raises to the caller: an NVML that
cannot start reports why in `why_unavailable`, and one that fails mid-run stops the thread and reports
`status == "failed: <reason>"`. The nvml module can be injected (tests use a fake one).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

COUNTER_WRAP = 2**32
# Above this period a counter can wrap more than once between samples at full PCIe speed
# (2**32 B / 55 GB/s = 78 ms) and the unwrapped totals would silently lose 4 GiB steps.
MAX_PERIOD_S = 0.07


@dataclass(frozen=True, slots=True)
class NvmlSample:
    """One NVML reading. Rates are None on the first sample (nothing to difference against)."""

    t_us: float  # µs since the sampler's time origin
    tx_bytes: int  # unwrapped link bytes sent by the GPU (D2H) since the sampler started
    rx_bytes: int  # unwrapped link bytes received by the GPU (H2D) since the sampler started
    tx_gb_s: float | None  # link GB/s (1e9 B/s) since the previous sample
    rx_gb_s: float | None
    gpu_util_pct: int | None  # None where the GPU does not report it (e.g. MIG)
    mem_util_pct: int | None
    mem_used_bytes: int | None
    sm_clock_mhz: int | None


class CounterUnwrapper:
    """A 64-bit running total of a counter that wraps at 2**32: adds (new - old) mod 2**32 per reading."""

    def __init__(self) -> None:
        self.last_raw: int | None = None
        self.total = 0

    def update(self, raw: int) -> int:
        raw %= COUNTER_WRAP
        if self.last_raw is not None:
            self.total += (raw - self.last_raw) % COUNTER_WRAP
        self.last_raw = raw
        return self.total


def _field_value(nvml: Any, value: Any) -> int:
    """The integer in an nvmlFieldValue_t, read through the member its valueType names."""
    member = {getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_INT", 1): "uiVal",
              getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG", 2): "ulVal",
              getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", 3): "ullVal",
              getattr(nvml, "NVML_VALUE_TYPE_SIGNED_LONG_LONG", 4): "sllVal",
              getattr(nvml, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal"}.get(value.valueType, "ullVal")
    return int(getattr(value.value, member))


def _error_text(nvml: Any, code: int) -> str:
    try:
        text = nvml.nvmlErrorString(code)
        return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:
        return f"NVML error {code}"


class NvmlSampler:
    """Samples one GPU through NVML on its own daemon thread into a bounded ring (see module doc)."""

    def __init__(self, device_index: int = 0, *, period_s: float = 0.02, capacity_samples: int = 50_000,
                 time_origin_ns: int | None = None, nvml: ModuleType | Any | None = None) -> None:
        if not 0 < period_s <= MAX_PERIOD_S:
            raise ValueError(f"period_s={period_s}: it must be in (0, {MAX_PERIOD_S}] s, because the 32-bit "
                             "PCIe byte counters wrap every ~78 ms at full speed")
        self.device_index = device_index
        self.period_s = period_s
        self.time_origin_ns = time.perf_counter_ns() if time_origin_ns is None else int(time_origin_ns)
        self._nvml = nvml
        self._handle: Any = None
        self._probed = False
        self._initialised = False
        self._why_unavailable: str | None = None
        self._optional_ok = {"utilization": True, "memory": True, "clock": True}
        self._lock = threading.Lock()
        self._ring: collections.deque[NvmlSample] = collections.deque(maxlen=capacity_samples)
        self._num_samples = 0
        self._status = "not started"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- availability -------------------------------------------------------------------------------

    def available(self) -> bool:
        """Whether NVML can sample this GPU's PCIe counters; the first call probes (fast NVML calls only)."""
        if not self._probed:
            self._probed = True
            self._why_unavailable = self._probe()
            if self._why_unavailable is not None:
                self._status = f"unavailable: {self._why_unavailable}"
        return self._why_unavailable is None

    @property
    def why_unavailable(self) -> str | None:
        """One line saying why sampling cannot run here; None when it can."""
        self.available()
        return self._why_unavailable

    def _probe(self) -> str | None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                return "nvidia-ml-py not installed (pip install nvidia-ml-py)"
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except Exception as exc:
            no_driver = {getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", 12),
                         getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", 9)}
            why = f"NVML could not initialise: {exc}"
            return why + " (no NVIDIA driver on this machine)" if getattr(exc, "value", None) in no_driver else why
        self._initialised = True
        try:
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as exc:
            return f"NVML has no GPU {self.device_index}: {exc}"
        try:
            self._read_pcie_raw()
        except Exception as exc:
            return f"field counters refused: {exc}"
        # Utilisation, memory and clock are extras: a GPU that refuses one (MIG, some vGPUs) still samples.
        for name, read in (("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(self._handle)),
                           ("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(self._handle)),
                           ("clock", lambda: nvml.nvmlDeviceGetClockInfo(self._handle, nvml.NVML_CLOCK_SM))):
            try:
                read()
            except Exception:
                self._optional_ok[name] = False
        return None

    def _read_pcie_raw(self) -> tuple[int, int, int, int]:
        """Raw (tx, rx) counters and their NVML timestamps (µs, 0 when absent); raises with the reason."""
        nvml = self._nvml
        values = nvml.nvmlDeviceGetFieldValues(
            self._handle, [nvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, nvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES])
        success = getattr(nvml, "NVML_SUCCESS", 0)
        for v, name in zip(values, ("TX", "RX")):
            if v.nvmlReturn != success:
                raise RuntimeError(f"PCIe {name} byte counter: {_error_text(nvml, v.nvmlReturn)}")
        tx, rx = values[0], values[1]
        return (_field_value(nvml, tx), _field_value(nvml, rx), int(getattr(tx, "timestamp", 0) or 0),
                int(getattr(rx, "timestamp", 0) or 0))

    # ---- running ------------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """"not started", "running", "stopped", "unavailable: <why>" or "failed: <why>"."""
        return self._status

    def start(self) -> bool:
        """Start the sampling thread; False (and nothing started) when NVML is unavailable."""
        if not self.available():
            return False
        if self._thread is not None and self._thread.is_alive():
            return True
        self._stop.clear()
        self._status = "running"
        self._thread = threading.Thread(target=self._run, name="kvlab-nvml", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread (keeps the samples); a failed status is kept."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._status == "running":
            self._status = "stopped"

    def close(self) -> None:
        """Stop and release NVML."""
        self.stop()
        if self._initialised:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down is best effort; the samples stay readable
                pass

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def samples(self, since: int = 0) -> tuple[list[NvmlSample], int]:
        """Samples at global index >= `since` still in the ring, and the index to pass next time."""
        with self._lock:
            first = self._num_samples - len(self._ring)
            count = self._num_samples - max(since, first)
            if count <= 0:
                return [], self._num_samples
            out = list(itertools.islice(reversed(self._ring), count))
            out.reverse()
            return out, self._num_samples

    def latest(self) -> NvmlSample | None:
        with self._lock:
            return self._ring[-1] if self._ring else None

    def _run(self) -> None:
        nvml, handle = self._nvml, self._handle
        tx_total, rx_total = CounterUnwrapper(), CounterUnwrapper()
        prev: tuple[int, int, int, float] | None = None  # tx total, rx total, nvml timestamp µs, t_us
        next_s = time.perf_counter()
        try:
            while not self._stop.is_set():
                before_ns = time.perf_counter_ns()
                tx_raw, rx_raw, tx_stamp_us, _ = self._read_pcie_raw()
                util = nvml.nvmlDeviceGetUtilizationRates(handle) if self._optional_ok["utilization"] else None
                memory = nvml.nvmlDeviceGetMemoryInfo(handle) if self._optional_ok["memory"] else None
                clock = nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM) if self._optional_ok["clock"] else None
                t_us = ((before_ns + time.perf_counter_ns()) // 2 - self.time_origin_ns) / 1000.0
                tx, rx = tx_total.update(tx_raw), rx_total.update(rx_raw)
                tx_gb_s = rx_gb_s = None
                if prev is not None:
                    # NVML's own timestamps say when the counters were read; our clock is the fallback.
                    stamps_ok = tx_stamp_us and prev[2] and tx_stamp_us > prev[2]
                    dt_us = tx_stamp_us - prev[2] if stamps_ok else t_us - prev[3]
                    if dt_us > 0:
                        tx_gb_s, rx_gb_s = (tx - prev[0]) / dt_us / 1e3, (rx - prev[1]) / dt_us / 1e3
                prev = (tx, rx, tx_stamp_us, t_us)
                sample = NvmlSample(
                    t_us=t_us, tx_bytes=tx, rx_bytes=rx, tx_gb_s=tx_gb_s, rx_gb_s=rx_gb_s,
                    gpu_util_pct=int(util.gpu) if util is not None else None,
                    mem_util_pct=int(util.memory) if util is not None else None,
                    mem_used_bytes=int(memory.used) if memory is not None else None,
                    sm_clock_mhz=int(clock) if clock is not None else None)
                with self._lock:
                    self._ring.append(sample)
                    self._num_samples += 1
                # Fixed-rate schedule; after a stall, resume from now rather than burst to catch up.
                next_s += self.period_s
                now_s = time.perf_counter()
                if next_s < now_s:
                    next_s = now_s + self.period_s
                self._stop.wait(next_s - now_s)
        except Exception as exc:  # NVML errors mid-run (GPU lost, driver reset) end sampling, not the app
            self._status = f"failed: {type(exc).__name__}: {exc}"
