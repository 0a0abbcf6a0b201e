"""Figures drawn on the server: the scheduler explorer, placeholders that say what a plot will show, and a static
lane timeline for committed images (bench/render_trace.py). The Profile panel's live plots are drawn by the page
itself (panels/live_plots.js).

The static timeline draws each lane as one WebGL trace of line segments (x: start, end, gap) rather than
`px.timeline`, which converts numbers to dates; it is downsampled first. Times are ms since the recorder's origin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

import json

from gradio.components.plot import PlotData

from engine.lab.explorer import ExploreResult
from engine.telemetry import LANE_LABELS, LANES, Span, downsample_segments

MAX_SEGMENTS = 4000  # bars the browser draws per update; more spans are merged across their smallest gaps
LANE_COLOURS = {"h2d_act": "#4c78a8", "h2d_kv": "#72b7b2", "recompute": "#f58518", "attention": "#e45756",
                "compute": "#54a24b", "d2h_writeback": "#b279a2"}
# No named template: applying one deep-copies it on every figure, and the live view redraws every second.
LAYOUT = dict(margin=dict(l=60, r=20, t=40, b=40), hovermode="closest", plot_bgcolor="white",
              xaxis=dict(gridcolor="#e5e5e5"), yaxis=dict(gridcolor="#e5e5e5"))


def _empty(title: str, message: str, *, height: int) -> go.Figure:
    fig = go.Figure(layout=dict(LAYOUT, title=title, height=height))
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def placeholder(title: str, message: str, *, height: int) -> PlotData:
    """An empty figure saying what will appear (plain Plotly JSON, no figure object to build)."""
    figure = {"data": [], "layout": {"title": {"text": title}, "height": height, "plot_bgcolor": "white",
                                     "xaxis": {"visible": False}, "yaxis": {"visible": False},
                                     "annotations": [{"text": message, "showarrow": False, "x": 0.5, "y": 0.5,
                                                      "xref": "paper", "yref": "paper"}]}}
    return PlotData(type="plotly", plot=json.dumps(figure))


def human_bytes(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def timeline_figure(spans: Sequence[Span], *, run_id: int, max_segments: int = MAX_SEGMENTS) -> go.Figure:
    """Lanes (rows) against time: one bar per span (per merged run of spans past `max_segments`)."""
    title = f"Run #{run_id}: lanes per layer"
    if not spans:
        return _empty(title, "No spans yet: the first decode step is on its way.", height=340)
    merged = len(spans) > max_segments
    if merged:
        bars = [(seg.lane, seg.start_us, seg.end_us,
                 f"{LANE_LABELS[seg.lane]}: {seg.num_spans} spans merged<br>{(seg.end_us - seg.start_us) / 1e3:.3f} ms, "
                 f"{human_bytes(seg.nbytes)}") for seg in downsample_segments(spans, max_segments)]
    else:
        bars = [(s.lane, s.start_us, s.end_us,
                 f"{LANE_LABELS[s.lane]}, layer {s.layer}, step {s.step}<br>{s.dur_us / 1e3:.3f} ms"
                 + (f", {human_bytes(s.nbytes)}" if s.nbytes else "")) for s in spans]
    by_lane: dict[str, list[tuple[float, float, str]]] = {lane: [] for lane in LANES}
    for lane, start_us, end_us, text in bars:
        by_lane[lane].append((start_us, end_us, text))
    fig = go.Figure()
    rows = {lane: len(LANES) - 1 - i for i, lane in enumerate(LANES)}  # the first lane on top
    for lane, lane_bars in by_lane.items():
        if not lane_bars:
            continue
        # Segment k is points 3k (start), 3k + 1 (end) and a NaN gap; numpy arrays keep plotly's checks cheap.
        xs = np.full(3 * len(lane_bars), np.nan)
        xs[0::3] = [start_us / 1e3 for start_us, _, _ in lane_bars]
        xs[1::3] = [end_us / 1e3 for _, end_us, _ in lane_bars]
        ys = np.full(len(xs), float(rows[lane]))
        ys[2::3] = np.nan
        texts = [t for _, _, text in lane_bars for t in (text, text, "")]
        fig.add_trace(go.Scattergl(x=xs, y=ys, mode="lines", name=LANE_LABELS[lane], hovertext=texts,
                                   hoverinfo="text", line=dict(width=14, color=LANE_COLOURS[lane])))
    shown = f"{len(bars):,} bars from {len(spans):,} spans" if merged else f"{len(spans):,} spans"
    fig.update_layout(LAYOUT, title=f"{title} ({shown})", height=340, showlegend=False, uirevision=f"timeline-{run_id}")
    fig.update_xaxes(title="ms since the run started")
    fig.update_yaxes(tickvals=list(rows.values()), ticktext=[LANE_LABELS[lane] for lane in rows],
                     range=[-0.6, len(LANES) - 0.4], zeroline=False)
    return fig


def explorer_figure(result: ExploreResult) -> go.Figure:
    """Predicted step time against the split, the PCIe floor, the auto choice, KVPR's rule and measured runs."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=list(result.splits), y=list(result.predicted_ms), mode="lines+markers",
                             name="predicted step ms"))
    fig.add_trace(go.Scatter(x=list(result.splits), y=list(result.floor_ms), mode="lines", name="PCIe floor ms",
                             line=dict(dash="dot", color="#888")))
    fig.add_trace(go.Scatter(x=[result.auto_split], y=[result.auto_ms], mode="markers", name="auto (scheduler)",
                             marker=dict(symbol="star", size=16, color="#e45756")))
    # The axis is the curve's: a measured point far above it is drawn at the top edge, its value in its label.
    top = 1.15 * max([*result.predicted_ms, *result.floor_ms, result.auto_ms])
    if result.measured:
        fig.add_trace(go.Scatter(x=[p.split for p in result.measured], y=[min(p.step_ms, top * 0.97) for p in result.measured],
                                 mode="markers+text", name="measured runs",
                                 text=[f"#{p.run_id}" + (f" ({p.step_ms:.1f} ms, off the axis)" if p.step_ms > top else "")
                                       for p in result.measured],
                                 textposition="top center", hovertext=[f"{p.label}: {p.step_ms:.3f} ms" for p in result.measured],
                                 marker=dict(symbol="diamond", size=11, color="#54a24b")))
    fig.add_vline(x=result.paper_split, line_dash="dash", line_color="#b279a2",
                  annotation_text=f"KVPR rule {result.paper_split:.2f}", annotation_position="top")
    fig.update_layout(LAYOUT, height=380, legend=dict(orientation="h", y=-0.25),
                      title=f"{result.placement}, batch {result.batch}, prompt {result.prompt_tokens}, "
                            f"{result.new_tokens} new tokens: step time vs split",
                      uirevision="explorer")
    fig.update_xaxes(title="fraction of offloaded tokens recomputed from activations", range=[-0.03, 1.03])
    fig.update_yaxes(title="ms per decode step", range=[0, top])
    return fig


__all__ = ["MAX_SEGMENTS", "explorer_figure", "human_bytes", "placeholder", "timeline_figure"]
