"""Scheduler explorer: predicted step time against the recompute split for the loaded model, the applied
placement and the profiling shape; the scheduler's auto choice, KVPR's rule, and measured runs of the same shape."""

from __future__ import annotations

import gradio as gr

from engine.explorer import ExploreResult
from engine.session import LabSession
from panels.errors import GPU_QUEUE, describe
from panels.plots import explorer_figure


def explorer_markdown(result: ExploreResult) -> str:
    best = result.best_split
    best_ms = result.predicted_ms[result.splits.index(best)]
    lines = [
        f"**Auto:** split {result.auto_split:.2f}, predicted {result.auto_ms:.3f} ms per step. {result.auto_reason}",
        f"**Best fixed split on the curve:** {best:.2f} ({best_ms:.3f} ms); "
        f"split 0 (copy all K/V): {result.predicted_ms[0]:.3f} ms.",
        f"**KVPR's rule** (serial formula, fixed A100 constants): split {result.paper_split:.2f}.",
        f"Offloaded tokens per sequence at the first step: {result.offloaded_tokens}.",
    ]
    if result.measured:
        lines.append("**Measured runs:** " + "; ".join(
            f"{p.label}: {p.step_ms:.3f} ms at split {p.split:.2f}" for p in result.measured))
    else:
        lines.append("No measured runs of this model, placement and shape yet: run a profile to add points.")
    if result.note:
        lines.append(f"_{result.note}_")
    return "\n\n".join(lines)


def build(session: LabSession) -> None:
    gr.Markdown("What the scheduler predicts for every split of the offloaded tokens between recomputation "
                "(activations over PCIe, then K/V = X·W) and plain K/V copies, with this machine's measured speeds.")
    predict = gr.Button("Predict for the applied settings", variant="primary")
    plot = gr.Plot(show_label=False)
    info = gr.Markdown("")

    def on_predict():
        try:
            settings, shape = session.settings, session.shape
            result = session.explore(settings, batch=shape.batch, prompt_tokens=shape.prompt_tokens)
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return gr.skip(), f"**Error:** {describe(exc)}"
        return explorer_figure(result), explorer_markdown(result)

    predict.click(on_predict, None, [plot, info], concurrency_id=GPU_QUEUE, concurrency_limit=1, api_name="explore")
