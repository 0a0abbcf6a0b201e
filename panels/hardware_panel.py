"""Hardware panel: the profiler's measurements of this machine (what the scheduler predicts with), its ceilings,
and whether NVML and CUPTI can sample here."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from engine.profiler import HardwareProfile
from engine.session import LabSession
from panels.errors import GPU_QUEUE, describe


def ceilings_markdown(profile: HardwareProfile, sources: dict[str, str]) -> str:
    best_gemm = max(p.rate for curve in profile.gemm for p in curve.points)
    both_ways = f"{profile.bidirectional_gb_s:.1f} GB/s total" if profile.bidirectional_gb_s else "not measured (no GPU)"
    lines = [
        f"**{profile.device_name}** · driver {profile.driver} · torch {profile.torch_version} · measured {profile.measured_at}",
        "",
        "| ceiling | figure |", "|---|---|",
        f"| best H2D copy | {profile.peak_h2d_gb_s:.1f} GB/s |",
        f"| best D2H copy | {max(p.rate for p in profile.d2h):.1f} GB/s |",
        f"| H2D + D2H at once | {both_ways} |",
        f"| device copy (read + write) | {profile.hbm_copy_gb_s:.0f} GB/s |",
        f"| decode attention (KV read) | {profile.attention_gb_s:.0f} GB/s |",
        f"| best recompute GEMM | {best_gemm:.1f} TFLOP/s |",
        f"| kernel launch (host) | {profile.launch_us:.1f} µs |",
        "",
        *(f"- **{name}:** {why}" for name, why in sources.items()),
        *(f"- {note}" for note in profile.notes),
    ]
    return "\n".join(lines)


def build(session: LabSession) -> None:
    gr.Markdown("The profiler measures copies, recompute GEMMs, device memory and attention once per GPU, driver "
                "and torch version, and caches them; the scheduler's predictions use these figures only.")
    with gr.Row():
        show = gr.Button("Show measurements", variant="primary")
        measure = gr.Button("Measure again")
    header = gr.Markdown("")
    table = gr.Dataframe(headers=["what", "size", "measured"], interactive=False)

    def on_show(refresh: bool):
        try:
            profile = session.hardware(refresh=refresh)
            sources = session.telemetry_sources()
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return f"**Error:** {describe(exc)}", gr.skip()
        return ceilings_markdown(profile, sources), pd.DataFrame(profile.rows(), columns=["what", "size", "measured"])

    show.click(lambda: on_show(False), None, [header, table], concurrency_id=GPU_QUEUE, concurrency_limit=1,
               api_name="hardware")
    measure.click(lambda: on_show(True), None, [header, table], concurrency_id=GPU_QUEUE, concurrency_limit=1,
                  api_name="measure_hardware")
