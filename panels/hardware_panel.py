"""Hardware panel: the profiler's measurements of this machine (what the scheduler predicts with), its ceilings,
whether NVML and CUPTI can sample here, and on a GPU the fast adapter's measured GEMM plan for the loaded model.

On a GPU the rows are the PCIe copies, device memory, decode attention and recompute GEMMs the scheduler uses. On
a CPU the same measurements are host-memory copies and CPU arithmetic: they are named as such, in units that show
their size, and the GPU-only ones (both copy directions at once) say they were not measured.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from engine.lab.session import LabSession
from engine.offload.profiler import HardwareProfile
from panels.api import PRIVATE, endpoint
from panels.errors import shown

COLUMNS = ["what", "size", "measured"]
EMPTY = ("_Press Show measurements: the profiler's figures for the loaded model's device. A device measured for the "
         "first time is measured then (some seconds; a GPU's figures are cached per GPU, driver and torch version)._")


def _rate(gb_s: float) -> str:
    """A copy or read rate in a unit that shows it (a slow host copy is MB/s, not "0.0 GB/s")."""
    if gb_s >= 1:
        return f"{gb_s:.1f} GB/s"
    return f"{gb_s:.2f} GB/s" if gb_s >= 0.1 else f"{gb_s * 1e3:.1f} MB/s"


def _flops(tflop_s: float) -> str:
    return f"{tflop_s:.1f} TFLOP/s" if tflop_s >= 1 else f"{tflop_s * 1e3:.1f} GFLOP/s"


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:g} {unit}"
    return f"{num_bytes} B"


def rows(profile: HardwareProfile) -> list[tuple[str, str, str]]:
    """(what, size, figure) rows, named for the device they were measured on."""
    gpu = profile.device_type == "cuda"
    if gpu:
        out = [("pinned H2D copy", _size(p.size), f"{p.rate:.1f} GB/s") for p in profile.h2d]
        out += [("pinned D2H copy", _size(p.size), f"{p.rate:.1f} GB/s") for p in profile.d2h]
        out.append(("H2D + D2H at once", _size(max(p.size for p in profile.h2d)),
                    f"{profile.bidirectional_gb_s:.1f} GB/s total"))
        out.append(("device copy (read + write)", "", f"{profile.hbm_copy_gb_s:.0f} GB/s"))
        out.append(("decode attention (KV read)", "", f"{profile.attention_gb_s:.0f} GB/s"))
    else:
        out = [("host memory copy (stands in for H2D)", _size(p.size), _rate(p.rate)) for p in profile.h2d]
        out += [("host memory copy (stands in for D2H)", _size(p.size), _rate(p.rate)) for p in profile.d2h]
        out.append(("H2D + D2H at once", "", "not measured: no GPU, no PCIe link"))
        out.append(("host memory copy (read + write)", "", _rate(profile.hbm_copy_gb_s)))
        out.append(("decode attention (torch SDPA on the CPU, KV read)", "", _rate(profile.attention_gb_s)))
    for curve in profile.gemm:
        for p in curve.points:
            out.append((f"recompute GEMM {curve.hidden}->{curve.out_features}" + ("" if gpu else " (CPU, fp32)"),
                        f"{p.size} rows", _flops(p.rate)))
    out.append(("kernel launch (host)" if gpu else "op dispatch (host)", "", f"{profile.launch_us:.1f} µs"))
    return out


def gemm_rows(spec, device) -> tuple[list[tuple[str, str, str]], str]:
    """The fast adapter's measured GEMM plan for the loaded model's projections (engine/fast/plan.py) as table
    rows, and a line saying what it is or why there is none."""
    if device.type != "cuda":
        return [], ("- **decode GEMMs:** no GPU: the fast adapter's GEMM plan (skinny kernel or cuBLAS per projection) "
                    "is a GPU measurement")
    from engine.fast.plan import FAST_FAMILIES, gemm_plan, model_plan_rows

    if spec.family not in FAST_FAMILIES:
        return [], f"- **decode GEMMs:** the {spec.family} family runs its plain adapter (cuBLAS): no GEMM plan"
    found = model_plan_rows(spec, gemm_plan(device))
    if not found:
        return [], ("- **decode GEMMs:** no GEMM plan measured on this GPU for this model's projections: the fast "
                    "adapter runs its default launches, and predictions estimate the GEMMs from the copy bandwidth. "
                    "`python -m engine.fast.plan --model MODEL --rows 1,8` measures one (seconds per shape).")
    out = []
    for r in found:
        other = f"cuBLAS {r['cublas_gb_s']:.0f}" if r["winner"] == "skinny" else \
            (f"skinny {r['skinny_gb_s']:.0f}" if r["skinny_gb_s"] else "skinny not run")
        won = r["skinny_gb_s"] if r["winner"] == "skinny" else r["cublas_gb_s"]
        out.append((f"decode GEMM, batch {r['rows']}: {r['projection']} ({r['shape']})",
                    f"{r['weight_mb']:.1f} MB" if r["weight_mb"] else "",
                    f"{r['winner']} {won:.0f} GB/s ({other})"))
    batches = sorted({r["rows"] for r in found})
    return out, (f"- **decode GEMMs:** the fast adapter's measured plan for batch {', '.join(map(str, batches))}: "
                 "per projection the faster of the skinny kernel and cuBLAS, its weight read in GB/s")


def ceilings_markdown(profile: HardwareProfile, sources: dict[str, str]) -> str:
    gpu = profile.device_type == "cuda"
    best_gemm = max(p.rate for curve in profile.gemm for p in curve.points)
    head = f"**{profile.device_name}** · driver {profile.driver} · torch {profile.torch_version} · measured {profile.measured_at}"
    if gpu:
        both = f"{profile.bidirectional_gb_s:.1f} GB/s total" if profile.bidirectional_gb_s else "not measured"
        table = [("best H2D copy", f"{profile.peak_h2d_gb_s:.1f} GB/s"),
                 ("best D2H copy", f"{max(p.rate for p in profile.d2h):.1f} GB/s"), ("H2D + D2H at once", both),
                 ("device copy (read + write)", f"{profile.hbm_copy_gb_s:.0f} GB/s"),
                 ("decode attention (KV read)", f"{profile.attention_gb_s:.0f} GB/s"),
                 ("best recompute GEMM", _flops(best_gemm)), ("kernel launch (host)", f"{profile.launch_us:.1f} µs")]
        intro = ""
    else:
        table = [("best host memory copy", _rate(profile.peak_h2d_gb_s)),
                 ("host memory copy (read + write)", _rate(profile.hbm_copy_gb_s)),
                 ("decode attention on the CPU", _rate(profile.attention_gb_s)),
                 ("best recompute GEMM on the CPU", _flops(best_gemm)),
                 ("op dispatch (host)", f"{profile.launch_us:.1f} µs")]
        intro = ("\n\n_No GPU here: these are the CPU's own figures (host-memory copies stand in for PCIe copies). "
                 "They let the offload path run and be tested; they are not what a GPU run would see, so the app "
                 "shows no GPU predictions from them._")
    lines = [head + intro, "", "| ceiling | figure |", "|---|---|", *(f"| {k} | {v} |" for k, v in table), "",
             *(f"- **{name}:** {why}" for name, why in sources.items()),
             *(f"- {note}" for note in profile.notes)]
    return "\n".join(lines)


def build(session: LabSession) -> None:
    gr.Markdown("The profiler measures copies, recompute GEMMs, device memory and attention once per device, driver "
                "and torch version, and caches them; the scheduler's predictions use these figures and, on a GPU, "
                "the fast adapter's measured GEMM plan for the loaded model.")
    with gr.Row():
        show = gr.Button("Show measurements", variant="primary")
        measure = gr.Button("Measure again")
    header = gr.Markdown(EMPTY)
    table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, visible=False)

    def measured(refresh: bool) -> tuple[HardwareProfile, dict[str, str], list, str]:
        """The profile (measured again when `refresh`), the telemetry sources, the GEMM-plan rows and their line."""
        profile = session.hardware(refresh=refresh)
        model = session.model
        extra, line = gemm_rows(model.spec, model.device) if model is not None else ([], "")
        return profile, session.telemetry_sources(), extra, line

    def on_show(refresh: bool):
        try:
            profile, sources, extra, line = measured(refresh)
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return f"**Error:** {shown(exc)}", gr.skip()
        header = ceilings_markdown(profile, sources) + (f"\n{line}" if line else "")
        return header, gr.update(value=pd.DataFrame(rows(profile) + extra, columns=COLUMNS), visible=True)

    show.click(lambda: on_show(False), None, [header, table], concurrency_id="hardware", concurrency_limit=1, **PRIVATE)
    measure.click(lambda: on_show(True), None, [header, table], concurrency_id="hardware", concurrency_limit=1,
                  **PRIVATE)

    def hardware(refresh: bool = False) -> dict:
        """The profiler's measurements of the loaded model's device (`refresh`: measure again, refused while a job
        uses the device), whether NVML and CUPTI can sample here, and the table the panel shows."""
        profile, sources, extra, line = measured(refresh)
        return {"device": profile.device_name, "device_type": profile.device_type, "driver": profile.driver,
                "torch": profile.torch_version, "measured_at": profile.measured_at,
                "rows": [list(row) for row in rows(profile) + extra], "sources": sources,
                "notes": list(profile.notes) + ([line.removeprefix("- ")] if line else [])}

    endpoint(hardware, api_name="hardware", output="hardware", concurrency_id="hardware", concurrency_limit=1)
