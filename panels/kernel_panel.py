"""Kernels: the decode-attention kernel's variants of one shape side by side, with time, GB/s and L2 hit rate.

The user picks pipeline depths (1, 2, 3 stages) x prefetch (off, 1 or 2 tiles ahead), `auto` (what the planner picks
on this device from its tuning table) and torch SDPA as the peer, and a shape; the session's kernel study
(engine/lab/kernel_study.py) runs them on the GPU, sampling L2 with CUPTI where it can. On the CPU it says that the
timings need a GPU and shows the plans beside the H200 figures committed under bench/results/.
"""

from __future__ import annotations

import gradio as gr
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.lab.kernel_study import ALL_ROWS, PEER, StudyResult, StudyShape
from engine.lab.session import LabSession
from panels.api import PRIVATE, endpoint
from panels.errors import DEVICE_QUEUE, describe
from panels.plots import LAYOUT, placeholder

DEFAULT = StudyShape()
BEST, OTHER, PEER_COLOUR = "#e45756", "#4c78a8", "#888888"


def study_figure(result: StudyResult) -> go.Figure:
    """Three bar charts on one row: ms, GB/s, L2 hit % per variant; the fastest variant and the peer coloured."""
    rows = [r for r in result.rows if r.ms is not None or r.l2_hit_pct is not None]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("ms per call (lower is better)", "K/V GB/s",
                                                        "L2 hit % (CUPTI)"), horizontal_spacing=0.08)
    if not rows:
        fig.update_layout(LAYOUT, height=360, title=f"{result.shape.label}: no figures here ({result.note})")
        return fig
    best = result.fastest
    names = [r.name for r in rows]
    colours = [BEST if best is not None and r.name == best.name else PEER_COLOUR if r.name == PEER else OTHER
               for r in rows]
    for col, (values, fmt) in enumerate((([r.ms for r in rows], "{:.4f}"), ([r.gb_s for r in rows], "{:.0f}"),
                                         ([r.l2_hit_pct for r in rows], "{:.1f}")), start=1):
        fig.add_trace(go.Bar(x=names, y=values, marker_color=colours, showlegend=False,
                             text=[fmt.format(v) if v is not None else "—" for v in values], textposition="outside",
                             cliponaxis=False),
                      row=1, col=col)
    if result.measured:
        device, where = result.device, "measured here"
    else:  # the GPU the committed rows were measured on ("committed: <device> (<SMs, torch>), <date>")
        device = next((r.source.removeprefix("committed: ").split(" (")[0] for r in rows
                       if r.source.startswith("committed: ")), result.device)
        where = "committed figures"
    fig.update_layout(LAYOUT, height=420, title=f"{result.shape.label} on {device} ({where})",
                      uirevision="kernel-study", margin=dict(l=50, r=20, t=70, b=140))
    fig.update_xaxes(tickangle=-40)
    return fig


def study_markdown(result: StudyResult) -> str:
    best = result.fastest
    head = (f"**Fastest: {best.name}**, {best.ms:.4f} ms, {best.gb_s:,.0f} GB/s." if best is not None and best.gb_s
            else "**No timings here.**")
    return f"{head} {result.note}\n\n**L2 column:** {result.l2_label}"


def _shape(batch, num_heads, num_kv_heads, seq_len, head_dim) -> StudyShape:
    return StudyShape(batch=int(batch), num_heads=int(num_heads), num_kv_heads=int(num_kv_heads),
                      seq_len=int(seq_len), head_dim=int(head_dim))


def run_study(session: LabSession, batch, num_heads, num_kv_heads, seq_len, head_dim, variants,
              sample_l2: bool = True) -> tuple[str, list[list], go.Figure | None]:
    """What the panel shows for these inputs: (the line above the table, the table's rows, the figure)."""
    try:
        result = session.kernel_study().run(_shape(batch, num_heads, num_kv_heads, seq_len, head_dim),
                                            list(variants or ()), sample_l2=bool(sample_l2))
    except Exception as exc:  # noqa: BLE001 - shown in the panel; the model stays loaded
        return f"**Error:** {describe(exc)}", [], None
    _, rows = result.table()
    return study_markdown(result), rows, study_figure(result)


def build(session: LabSession) -> None:
    gr.Markdown("The decode-attention kernel's variants of one shape, side by side: pipeline depth (1, 2, 3 stages) "
                "x bulk L2 prefetch (off, 1 or 2 tiles ahead), `auto` (this device's measured pick) and torch SDPA "
                "as the peer. Each call reads its K/V cold from DRAM; GB/s decides, the L2 hit rate explains.")
    with gr.Row():
        batch = gr.Number(DEFAULT.batch, precision=0, minimum=1, label="batch B")
        heads = gr.Number(DEFAULT.num_heads, precision=0, minimum=1, label="query heads Hq")
        kv_heads = gr.Number(DEFAULT.num_kv_heads, precision=0, minimum=1, label="KV heads Hkv")
        seq_len = gr.Number(DEFAULT.seq_len, precision=0, minimum=1, label="keys per sequence S")
        head_dim = gr.Number(DEFAULT.head_dim, precision=0, minimum=1, maximum=256, label="head dim D")
    variants = gr.CheckboxGroup(list(ALL_ROWS), value=list(ALL_ROWS), label="variants")
    with gr.Row():
        sample_l2 = gr.Checkbox(True, label="Sample the L2 hit rate with CUPTI over each variant's loop (GPU)")
        run = gr.Button("Run the variants", variant="primary")
    info = gr.Markdown("")
    table = gr.Dataframe(headers=["variant", "ms", "GB/s", "L2 hit %", "vs fastest", "plan", "source"],
                         interactive=False, wrap=True)
    plot = gr.Plot(placeholder("Time, GB/s and L2 hit rate per variant", "Press Run the variants: the bars appear "
                               "here (on the CPU, the committed H200 figures of the shape, where there are some).",
                               height=420), show_label=False)

    def on_run(b, h, hk, s, d, chosen, l2):
        text, rows, figure = run_study(session, b, h, hk, s, d, chosen, l2)
        return text, rows, figure if figure is not None else gr.skip()

    run.click(on_run, [batch, heads, kv_heads, seq_len, head_dim, variants, sample_l2], [info, table, plot],
              concurrency_id=DEVICE_QUEUE, concurrency_limit=16, **PRIVATE)

    def kernel_study(batch: int = DEFAULT.batch, num_heads: int = DEFAULT.num_heads,
                     num_kv_heads: int = DEFAULT.num_kv_heads, seq_len: int = DEFAULT.seq_len,
                     head_dim: int = DEFAULT.head_dim, variants: str = "", sample_l2: bool = True) -> dict:
        """Run decode-attention variants of one bf16 shape on the session's device: `variants` comma-separated names
        (empty: all; /kernel_variants lists them). Each row: ms, GB/s of K+V, L2 hit % (CUPTI, GPU), the plan and
        where its figures come from (on a CPU: the committed GPU figures of that shape, or the plans only)."""
        names = [v.strip() for v in variants.split(",") if v.strip()]
        result = session.kernel_study().run(_shape(batch, num_heads, num_kv_heads, seq_len, head_dim), names,
                                            sample_l2=bool(sample_l2))
        return result.as_dict()

    def kernel_variants() -> dict:
        """The variant names /kernel_study takes, in the table's order."""
        return {"variants": list(ALL_ROWS)}

    endpoint(kernel_study, api_name="kernel_study", output="study", concurrency_id=DEVICE_QUEUE, concurrency_limit=16)
    endpoint(kernel_variants, api_name="kernel_variants", output="variants", queue=False)


__all__ = ["build", "run_study", "study_figure", "study_markdown"]
