"""Measured tuning table of the decode-attention kernel: per shape class, the fastest pipeline depth and prefetch.

bench/suites/decode_attention_study.py times every (num_stages, prefetch, distance) variant on a device and writes
the table; `plan_segments` reads it, so `prefetch="auto"` and an unset `num_stages` pick the measured variant for a
shape in a measured class (and keep today's rules outside every class). One JSON file per device, keyed by the GPU's
name, the driver and the Triton version (a new driver or compiler may move the optimum), in the directory the
hardware profile caches into (engine/cache_files.py: $KVLAB_CACHE_DIR, else $XDG_CACHE_HOME/kvlab, else
~/.cache/kvlab; then hardware/). Importable without triton's kernels; no tensors.

A shape class: (seq, KV head) rows B*Hkv and the keys a sequence can see, each rounded up to a power of two, the
head dim and the dtype. Neighbouring shapes share a grid's occupancy and a split's tile count within a factor of two.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

TABLE_VERSION = 1


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def shape_class(rows: int, num_keys: int, head_dim: int, dtype: str) -> str:
    """The class a (B*Hkv rows, keys, head dim, dtype) attention call falls in, as the table's key."""
    return f"rows<={_next_power_of_2(rows)} keys<={_next_power_of_2(num_keys)} d{head_dim} {dtype}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TunedVariant:
    """The fastest measured variant of one shape class."""

    num_stages: int
    prefetch: bool
    prefetch_distance: int
    gb_s: float  # K/V bytes per second of the measured shape(s) in the class
    measured_shape: tuple[int, ...] = ()  # (B, Hq, Hkv, S) it was measured on

    def __post_init__(self) -> None:
        if self.num_stages not in (1, 2, 3) or self.prefetch_distance not in (1, 2):
            raise ValueError(f"a tuned variant needs num_stages in 1..3 and distance 1 or 2, got {self!r}")


@dataclass(frozen=True)
class TuningTable:
    device: str  # GPU name, driver, triton version: what the file name is keyed by
    measured_at: str  # ISO date-time, UTC
    entries: dict[str, TunedVariant] = field(default_factory=dict)  # shape_class -> variant
    version: int = TABLE_VERSION

    def lookup(self, rows: int, num_keys: int, head_dim: int, dtype: str) -> tuple[str, TunedVariant | None]:
        """-> (the class, its tuned variant or None when the class was not measured)."""
        key = shape_class(rows, num_keys, head_dim, dtype)
        return key, self.entries.get(key)

    def merged(self, newer: "TuningTable") -> "TuningTable":
        """This table with `newer`'s classes replacing or adding to its own."""
        return TuningTable(device=newer.device, measured_at=newer.measured_at, entries={**self.entries, **newer.entries})

    def to_json(self) -> str:
        payload = asdict(self)
        payload["entries"] = {k: asdict(v) for k, v in sorted(self.entries.items())}
        return json.dumps(payload, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TuningTable":
        raw = json.loads(text)
        if raw.get("version") != TABLE_VERSION:
            raise ValueError(f"tuning table version {raw.get('version')!r}, expected {TABLE_VERSION}")
        entries = {k: TunedVariant(**{**v, "measured_shape": tuple(v.get("measured_shape", ()))})
                   for k, v in raw["entries"].items()}
        return cls(device=raw["device"], measured_at=raw["measured_at"], entries=entries)


def device_key(device: torch.device | str) -> str:
    """GPU name + driver + triton version (CPU: the interpreter), as one file-name-safe string."""
    import triton

    device = torch.device(device)
    if device.type != "cuda":
        name, driver = "cpu-interpreter", "none"
    else:
        name = torch.cuda.get_device_name(device)
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:  # noqa: BLE001 - NVML is optional for the key: fall back to the CUDA runtime's version
            driver = f"cuda {torch.version.cuda}"
    return re.sub(r"[^A-Za-z0-9.]+", "-", f"{name}_{driver}_triton-{triton.__version__}").strip("-")


def cache_dir() -> Path:
    """The hardware profile's cache directory (engine/offload/profiler.py cache_dir), kernels not importing engine."""
    root = os.environ.get("KVLAB_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "kvlab")
    return Path(root).expanduser() / "hardware"


def table_path(device: torch.device | str) -> Path:
    """Where the study writes, and the planner reads, `device`'s table."""
    env = (os.environ.get("KVLAB_CACHE_DIR"), os.environ.get("XDG_CACHE_HOME"))
    return _table_path(str(device), env)


@functools.lru_cache(maxsize=64)
def _table_path(device: str, env: tuple[str | None, str | None]) -> Path:
    # per device and cache-dir setting: NVML is slow to ask, and the planner asks on every launch
    return cache_dir() / f"decode-attention-tuning_{device_key(device)}.json"


def load_table(path: Path) -> TuningTable | None:
    """The table at `path`, or None when there is none or it cannot be read (then the rules decide)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _load(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, size: int) -> TuningTable | None:
    # keyed by modification time and size: a table the study rewrites is read again, an unchanged one never
    try:
        return TuningTable.from_json(Path(path).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def device_table(device: torch.device | str) -> TuningTable | None:
    """The tuning table measured on `device` (this GPU, driver and triton), if one was written."""
    return load_table(table_path(device))


def write_table(table: TuningTable, path: Path, *, merge: bool = True) -> Path:
    """Write `table` to `path` (merged over what is there when `merge`), atomically."""
    if merge and (old := load_table(path)) is not None:
        table = old.merged(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(table.to_json())
    tmp.replace(path)
    return path


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
