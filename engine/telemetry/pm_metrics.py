"""Which CUPTI PM-sampling counters a chip takes in one pass, what each sampled value means, and its label.

Counters are chosen from what the chip says, not from guessed names: `choose_counters` reads the chip's single-pass
sets (cupti.profiler_host.get_single_pass_sets, get_metrics_in_single_pass_set), finds the members that measure each
role below by their base name, gives each the sub-metric its kind takes (asked of the chip where it answers, else
the kind's usual ones: set-prefixed names such as `LTS.TriageCompute.lts__..._realtime` take `.pct`/`.ratio` only),
and keeps a member only while the whole selection still builds one single-pass configuration. PCIe bytes (and DRAM
bytes where no set names a DRAM rate) are ordinary metrics collected on GH100 before; they join the same check.

Measured on an H200 (GH100, cupti-python 13.4, 2026-12-01): set `TriageCompute` names
`LTS.TriageCompute.lts__average_t_sector_hit_rate_realtime` and `..._srcunit_tex_realtime`; these, `pcie__read_bytes`
`pcie__write_bytes` and `lts__t_sectors_srcunit_tex` (`.sum`) configure together. The hit rate is averaged over the
L2's two partitions, so a loop whose reads all hit reads about 48 % and a DRAM-streaming loop about 25 %: labels say
so with the figures measured on the device itself (engine/telemetry/cupti_calibration.py).

Pure Python, no cupti import: tests feed recorded set lists.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# Roles a sampled value can play. The first L2 role found is the one shown as "L2 hit %".
L2_SM = "l2_sm"  # hit rate of the SMs' (texture-path) requests: what decode attention's K/V reads see
L2_ALL = "l2_all"  # hit rate of every L2 request (SMs, copies, the other partition)
DRAM_PCT = "dram_pct"  # DRAM read throughput, % of peak
DRAM_BYTES = "dram_bytes"  # DRAM bytes read
STALL = "stall_long_scoreboard"  # warps waiting on a memory load (long scoreboard)
L2_SM_SECTORS = "l2_sm_sectors"  # 32-byte sectors the SMs asked of L2
PCIE_READ = "pcie_read"  # bytes the GPU read over PCIe (host to device)
PCIE_WRITE = "pcie_write"
L2_ROLES = (L2_SM, L2_ALL)
SECTOR_BYTES = 32

# Base names (no unit/set prefix, no sub-metric) per role, most wanted first.
_PATTERNS: dict[str, tuple[str, ...]] = {
    L2_SM: (r"lts__average_t_sector_hit_rate_srcunit_tex(_realtime)?", r"lts__t_sector_hit_rate_srcunit_tex"),
    L2_ALL: (r"lts__average_t_sector_hit_rate(_realtime)?", r"lts__t_sector_hit_rate"),
    DRAM_PCT: (r"dramc__read_throughput", r"dram__read_throughput", r"dramc__throughput", r"dram__throughput"),
    DRAM_BYTES: (r"dram__bytes_read", r"dramc__bytes_read"),
    STALL: (r"smsp__average_warps_issue_stalled_long_scoreboard(_per_issue_active|_per_warp_active)?",
            r"smsp__warps_issue_stalled_long_scoreboard"),
    L2_SM_SECTORS: (r"lts__t_sectors_srcunit_tex",),
    PCIE_READ: (r"pcie__read_bytes",),
    PCIE_WRITE: (r"pcie__write_bytes",),
}
_COMPILED = {role: tuple(re.compile(p + "$") for p in patterns) for role, patterns in _PATTERNS.items()}
# Sub-metrics per role, most wanted first (the chip's own list, where it gives one, filters these).
_SUFFIXES: dict[str, tuple[str, ...]] = {
    L2_SM: (".pct", ".ratio"), L2_ALL: (".pct", ".ratio"),
    DRAM_PCT: (".avg.pct_of_peak_sustained_elapsed", ".pct", ".ratio"),
    STALL: (".pct", ".ratio", ".avg.per_cycle_active", ".avg.per_cycle_elapsed", ".avg", ".sum"),
    DRAM_BYTES: (".sum",), L2_SM_SECTORS: (".sum",), PCIE_READ: (".sum",), PCIE_WRITE: (".sum",),
}
# Ordinary metrics asked for by name when no set lists them (each collected in PM sampling on GH100 before).
KNOWN = {PCIE_READ: "pcie__read_bytes.sum", PCIE_WRITE: "pcie__write_bytes.sum", DRAM_BYTES: "dram__bytes_read.sum",
         L2_SM_SECTORS: "lts__t_sectors_srcunit_tex.sum"}
_SUBMETRIC = re.compile(r"\.(sum|avg|max|min|pct|ratio|peak_sustained\w*|per_\w+|pct_of_\w+)(\..+)?$")


def split_name(listed: str) -> tuple[str, str, str]:
    """"LTS.TriageCompute.lts__x_realtime.pct" -> ("LTS.TriageCompute.", "lts__x_realtime", ".pct"): the unit/set
    prefix, the base name (the part holding "__") and the sub-metric, each "" when absent."""
    parts = listed.split(".")
    base_at = next((i for i, part in enumerate(parts) if "__" in part), None)
    if base_at is None:
        return "", listed, ""
    prefix = ".".join(parts[:base_at])
    suffix = ".".join(parts[base_at + 1:])
    return (prefix + "." if prefix else ""), parts[base_at], ("." + suffix if suffix else "")


def role_of(metric: str) -> str | None:
    """The role a metric name (listed or configured) plays, or None."""
    base = split_name(metric)[1]
    for role, patterns in _COMPILED.items():
        if any(p.match(base) for p in patterns):
            return role
    return None


def _rank(role: str, base: str) -> int:
    return next(i for i, p in enumerate(_COMPILED[role]) if p.match(base))


@dataclass(frozen=True)
class CounterChoice:
    """What to configure on a chip: metric names in order, the role of each, and what could not be had and why."""

    chip: str
    sets: tuple[str, ...]  # every single-pass set the chip lists
    set_name: str | None  # the set the L2 (and other set) counters come from
    metrics: tuple[str, ...]  # configured names, in order
    roles: dict[str, str] = field(default_factory=dict)  # role -> configured metric name
    missing: tuple[str, ...] = ()  # one line per role not sampled: what was looked for and why it is absent
    use_set_name: bool = False  # the host needs single_pass_metric_set_name to take the set's names

    @property
    def l2_role(self) -> str | None:
        return next((role for role in L2_ROLES if role in self.roles), None)

    @property
    def l2_metric(self) -> str | None:
        role = self.l2_role
        return self.roles[role] if role else None


def _candidates(role: str, listed: str, set_name: str,
                submetrics: Callable[[str], Sequence[str] | None] | None) -> list[str]:
    """Configurable names for a listed member, most wanted first: its sub-metrics (the chip's list where it gives
    one), then, for a member listed without its unit/set prefix, the prefixed form ("LTS.<set>.lts__x.pct") that
    set members take, with .pct/.ratio only."""
    prefix, base, suffix = split_name(listed)
    if _SUBMETRIC.search(suffix or "-"):
        return [listed]  # listed with its sub-metric already
    wanted = _SUFFIXES[role]
    offered = submetrics(listed) if submetrics is not None else None
    names = [listed + s for s in wanted]
    if offered:  # "pct", ".pct" or the whole "lts__x.pct": each as ".pct"
        normalised = {"." + s.split(base, 1)[-1].lstrip(".") for s in offered}
        kept = [s for s in wanted if s in normalised]
        names = [listed + s for s in kept] or names
    if not prefix and set_name:
        names += [f"{base.split('__')[0].upper()}.{set_name}.{base}{s}" for s in (".pct", ".ratio") if s in wanted]
    return names


def choose_counters(chip: str, sets: Mapping[str, Sequence[str]] | None,
                    accepts: Callable[[Sequence[str], str | None], bool], *,
                    submetrics: Callable[[str], Sequence[str] | None] | None = None) -> CounterChoice:
    """The counters to sample on `chip` from its single-pass `sets` ({set: [member names]}; None when CUPTI cannot
    list them), `accepts(metrics, set_name)` saying whether those metrics build one single-pass configuration (on a
    host given the set's name, or none), `submetrics(name)` the sub-metrics the chip offers for a name (None: it
    does not say). Order: the L2 hit rates, PCIe read/write, DRAM, long-scoreboard stalls, L2 sectors."""
    set_names = tuple(sets or ())
    missing: list[str] = []
    # role -> (set, listed name), the best-ranked member over all sets, L2 first deciding which set is used
    found: dict[str, tuple[str, str]] = {}
    for set_name in set_names:
        for listed in sets[set_name]:
            role = role_of(listed)
            if role is None:
                continue
            base = split_name(listed)[1]
            if role not in found or _rank(role, base) < _rank(role, split_name(found[role][1])[1]):
                found[role] = (set_name, listed)
    l2_set = next((found[r][0] for r in L2_ROLES if r in found), None)
    if sets is None:
        missing.append(f"L2 hit rate: this cupti-python cannot list {chip}'s single-pass sets "
                       "(profiler_host.get_single_pass_sets needs cupti-python >= 13.4), so no L2 counter is chosen")
    elif l2_set is None:
        wanted = ", ".join(p.replace("(_realtime)?", "_realtime") for p in _PATTERNS[L2_SM][:1] + _PATTERNS[L2_ALL][:1])
        listed = ", ".join(f"{s} ({len(sets[s])} metrics)" for s in set_names) or "none"
        missing.append(f"L2 hit rate: no single-pass set of {chip} names one (sets: {listed}; looked for {wanted})")

    chosen: list[str] = []
    roles: dict[str, str] = {}
    mode: list[str | None] = [None]  # the set name the host needs, once one L2 counter decided it

    def try_add(role: str, names: list[str]) -> bool:
        modes = [mode[0]] if roles else [None] + ([l2_set] if l2_set else [])
        for use in modes:
            if accepts([*chosen, *names], use):
                mode[0] = use
                chosen.extend(names)
                return True
        return False

    def add_member(role: str) -> None:
        if role not in found:
            return
        set_name, listed = found[role]
        for name in _candidates(role, listed, set_name, submetrics):
            if try_add(role, [name]):
                roles[role] = name
                return
        missing.append(f"{role}: {listed} is listed but refused with the others in one pass")

    for role in L2_ROLES:
        add_member(role)
    if try_add(PCIE_READ, [KNOWN[PCIE_READ], KNOWN[PCIE_WRITE]]):
        roles[PCIE_READ], roles[PCIE_WRITE] = KNOWN[PCIE_READ], KNOWN[PCIE_WRITE]
    else:
        missing.append(f"PCIe: {KNOWN[PCIE_READ]} and {KNOWN[PCIE_WRITE]} refused with the others in one pass")
    add_member(DRAM_PCT)
    if DRAM_PCT not in roles:
        if try_add(DRAM_BYTES, [KNOWN[DRAM_BYTES]]):
            roles[DRAM_BYTES] = KNOWN[DRAM_BYTES]
        else:
            missing.append(f"DRAM: no set member and {KNOWN[DRAM_BYTES]} refused with the others in one pass")
    if STALL in found:
        add_member(STALL)
    else:
        missing.append(f"long-scoreboard stalls: no single-pass set of {chip} names smsp__warps_issue_stalled_long_"
                       "scoreboard")
    if L2_SM_SECTORS in found:
        add_member(L2_SM_SECTORS)
    elif L2_SM in roles and try_add(L2_SM_SECTORS, [KNOWN[L2_SM_SECTORS]]):
        roles[L2_SM_SECTORS] = KNOWN[L2_SM_SECTORS]
    return CounterChoice(chip=chip, sets=set_names, set_name=l2_set if roles.keys() & set(L2_ROLES) else None,
                         metrics=tuple(chosen), roles=roles, missing=tuple(missing), use_set_name=mode[0] is not None)


# ---- what a sampled value means ------------------------------------------------------------------------------

COUNTER_L2 = "L2 hit %"
COUNTER_PM_L2_ALL = "L2 hit % of all requests (CUPTI PM sampling)"
COUNTER_PM_PCIE = "PCIe GB/s (CUPTI PM sampling)"
COUNTER_PM_DRAM = "DRAM read GB/s (CUPTI PM sampling)"
COUNTER_PM_DRAM_PCT = "DRAM read % of peak (CUPTI PM sampling)"
COUNTER_PM_STALL = "Long-scoreboard stalls (CUPTI PM sampling)"
COUNTER_PM_L2_SECTORS = "L2 GB/s requested by the SMs (CUPTI PM sampling)"
# Every track cupti_counters writes, in the order a panel would stack them.
PM_TRACKS = (COUNTER_L2, COUNTER_PM_L2_ALL, COUNTER_PM_DRAM, COUNTER_PM_DRAM_PCT, COUNTER_PM_STALL,
             COUNTER_PM_L2_SECTORS, COUNTER_PM_PCIE)


def _stall_field(metric: str) -> str:
    suffix = split_name(metric)[2]
    if suffix in (".pct", ".ratio") or "per_warp_active" in metric or "per_issue_active" in metric:
        return "per issued instruction" if "per_issue_active" in metric else suffix.lstrip(".")
    return {".avg.per_cycle_active": "warps per SMSP-cycle", ".avg.per_cycle_elapsed": "warps per SMSP-cycle",
            ".sum.per_cycle_elapsed": "warps per cycle, all SMSPs"}.get(suffix, "warp-cycles")


def cupti_counters(samples: Iterable, *, origin_wall_ns: int) -> dict[str, list[tuple[float, dict[str, float]]]]:
    """PM samples (start/end in GPU global-timer ns, on the host's wall clock; `values` by metric name; `l2_hit_pct`
    the shown L2 figure) as counter tracks on the recorder's µs axis, each point at its sample's start: L2 hit %
    (and of all requests, when both are sampled), PCIe read/write and DRAM read GB/s, DRAM read % of peak,
    long-scoreboard stalls and the L2 GB/s the SMs request. Zero-length samples and NaN values are skipped."""
    tracks: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in PM_TRACKS}
    for sample in samples:
        dur_ns = sample.end_ns - sample.start_ns
        if dur_ns <= 0:
            continue
        t_us = (sample.start_ns - origin_wall_ns) / 1000.0
        by_role: dict[str, tuple[str, float]] = {}
        for metric, value in sample.values.items():
            role = role_of(metric)
            if role is not None and value is not None and math.isfinite(value):
                by_role[role] = (metric, float(value))
        if PCIE_READ in by_role or PCIE_WRITE in by_role:
            tracks[COUNTER_PM_PCIE].append((t_us, {"read": by_role.get(PCIE_READ, ("", 0.0))[1] / dur_ns,
                                                   "write": by_role.get(PCIE_WRITE, ("", 0.0))[1] / dur_ns}))
        if DRAM_BYTES in by_role:
            tracks[COUNTER_PM_DRAM].append((t_us, {"read": by_role[DRAM_BYTES][1] / dur_ns}))
        if DRAM_PCT in by_role:
            tracks[COUNTER_PM_DRAM_PCT].append((t_us, {"read": by_role[DRAM_PCT][1]}))
        if STALL in by_role:
            metric, value = by_role[STALL]
            tracks[COUNTER_PM_STALL].append((t_us, {_stall_field(metric): value}))
        if L2_SM_SECTORS in by_role:
            requested_gb_s = by_role[L2_SM_SECTORS][1] * SECTOR_BYTES / dur_ns
            tracks[COUNTER_PM_L2_SECTORS].append((t_us, {"requested": requested_gb_s}))
        pct = sample.l2_hit_pct
        if pct is not None and math.isfinite(pct):
            tracks[COUNTER_L2].append((t_us, {"L2 hit %": float(pct)}))
            if L2_SM in by_role and L2_ALL in by_role:  # the shown figure is the SMs'; all requests beside it
                tracks[COUNTER_PM_L2_ALL].append((t_us, {"all requests": by_role[L2_ALL][1]}))
    return {name: track for name, track in tracks.items() if track}


# ---- labels ---------------------------------------------------------------------------------------------------

PARTITION_CAVEAT = ("averaged over the L2's two partitions, so a workload whose every read hits in L2 reads about "
                    "half, not 100 %")


def calibration_sentence(calibration, metric: str | None) -> str:
    """What an all-hit and a DRAM-streaming loop read on this device with `metric` (the calibration's own words
    when it did not run)."""
    if calibration is None or metric is None:
        return "the all-hit reading of this device was not measured"
    figures = calibration.figures(metric)
    if figures is None:
        return f"the all-hit reading of this device was not measured ({calibration.note or 'no samples'})"
    resident, streaming = figures
    return (f"an all-hit (L2-resident) loop reads {resident:.0f} % here and a DRAM-streaming loop {streaming:.0f} % "
            f"({calibration.device}, {calibration.measured_at[:10]})")


def l2_formula(choice: CounterChoice | None) -> str | None:
    """The shown L2 figure in a few words: which counter, and that it is partition-averaged."""
    if choice is None or choice.l2_metric is None:
        return None
    whose = "SM requests" if choice.l2_role == L2_SM else "all requests"
    return f"{choice.l2_metric}: L2 hit rate of {whose}, partition-averaged"


def series_labels(choice: CounterChoice, *, interval_us: int, calibration=None) -> dict[str, str]:
    """{track: what its values are}, for each track these counters fill: the counter, its unit and its meaning."""
    every = f"CUPTI PM sampling every {interval_us / 1000:g} ms"
    roles = choice.roles
    labels: dict[str, str] = {}
    if choice.l2_metric is not None:
        whose = "the SMs' requests (the K/V reads of decode attention)" if choice.l2_role == L2_SM else "all requests"
        labels[COUNTER_L2] = (f"L2 hit rate of {whose}, % ({choice.l2_metric}, set {choice.set_name}, {every}); "
                              f"{PARTITION_CAVEAT}: {calibration_sentence(calibration, choice.l2_metric)}")
    if L2_SM in roles and L2_ALL in roles:
        labels[COUNTER_PM_L2_ALL] = (f"L2 hit rate of all requests, % ({roles[L2_ALL]}, {every}); {PARTITION_CAVEAT}: "
                                     f"{calibration_sentence(calibration, roles[L2_ALL])}")
    if PCIE_READ in roles:
        labels[COUNTER_PM_PCIE] = (f"PCIe GB/s read (host to GPU) and written by the GPU ({roles[PCIE_READ]}, "
                                   f"{roles[PCIE_WRITE]} over each sample, {every})")
    if DRAM_BYTES in roles:
        labels[COUNTER_PM_DRAM] = f"DRAM GB/s read ({roles[DRAM_BYTES]} over each sample, {every})"
    if DRAM_PCT in roles:
        labels[COUNTER_PM_DRAM_PCT] = f"DRAM read throughput, % of its peak ({roles[DRAM_PCT]}, {every})"
    if STALL in roles:
        labels[COUNTER_PM_STALL] = (f"warps stalled waiting on a memory load (long scoreboard), "
                                    f"{_stall_field(roles[STALL])} ({roles[STALL]}, {every}): high while reads "
                                    "wait on DRAM")
    if L2_SM_SECTORS in roles:
        labels[COUNTER_PM_L2_SECTORS] = (f"GB/s the SMs requested of L2 ({roles[L2_SM_SECTORS]} x {SECTOR_BYTES} B "
                                         f"over each sample, {every})")
    return labels


__all__ = ["COUNTER_L2", "COUNTER_PM_DRAM", "COUNTER_PM_DRAM_PCT", "COUNTER_PM_L2_ALL", "COUNTER_PM_L2_SECTORS",
           "COUNTER_PM_PCIE", "COUNTER_PM_STALL", "CounterChoice", "DRAM_BYTES", "DRAM_PCT", "KNOWN", "L2_ALL",
           "L2_ROLES", "L2_SM", "L2_SM_SECTORS", "PARTITION_CAVEAT", "PCIE_READ", "PCIE_WRITE", "PM_TRACKS", "STALL",
           "calibration_sentence", "choose_counters", "cupti_counters", "l2_formula", "role_of", "series_labels",
           "split_name"]
