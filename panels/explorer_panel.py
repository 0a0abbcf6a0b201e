"""Scheduler explorer: predicted step time against the recompute split for the loaded model, this tab's applied
placement and profiling shape; the scheduler's auto choice, KVPR's rule, and measured runs of the same shape.

The predictions are GPU step times from the device's measured PCIe and GPU speeds: on a machine without a GPU
there is nothing for them to mean, so the panel says so instead of drawing a curve.
"""

from __future__ import annotations

import gradio as gr

from engine.errors import InvalidSettingsError
from engine.lab.explorer import ExploreResult
from engine.lab.session import LabSession
from panels.api import PRIVATE, endpoint, owner
from panels.errors import shown
from panels.plots import explorer_figure, placeholder

NO_GPU = ("**No predictions here: the model runs on the CPU.** The scheduler predicts GPU step times from the "
          "device's measured PCIe copy and GPU speeds; a CPU has neither, so a curve would mean nothing. Load the "
          "model on a GPU to explore, or import a run measured on one (Profile tab) to compare it.")


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


def _explore(session: LabSession, who: str | None) -> ExploreResult:
    model = session.require_model()
    if model.device.type != "cuda":
        raise InvalidSettingsError(NO_GPU.replace("**", ""))
    settings, shape = session.settings_for(who)
    return session.explore(settings, batch=shape.batch, prompt_tokens=shape.prompt_tokens)


def build(session: LabSession, *, app: gr.Blocks, model_key: gr.Textbox) -> None:
    gr.Markdown("What the scheduler predicts for every split of the offloaded tokens between recomputation "
                "(activations over PCIe, then K/V = X·W) and plain K/V copies, with this machine's measured speeds, "
                "for this tab's applied settings.")
    predict = gr.Button("Predict for the applied settings", variant="primary")
    plot = gr.Plot(placeholder("Step time against the split", "Press Predict: the curve for the loaded model and "
                               "this tab's applied shape appears here.", height=380), show_label=False)
    info = gr.Markdown("")

    def on_predict(request: gr.Request):
        model = session.model
        if model is not None and model.device.type != "cuda":
            return gr.skip(), NO_GPU
        try:
            result = _explore(session, owner(request))
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return gr.skip(), f"**Error:** {shown(exc)}"
        return explorer_figure(result), explorer_markdown(result)

    def on_device():
        """On a CPU: the reason in the place of the curve, and nothing to press."""
        model = session.model
        gpu = model is None or model.device.type == "cuda"
        return (gr.update(interactive=gpu), gr.update(visible=gpu), "" if gpu else NO_GPU)

    predict.click(on_predict, None, [plot, info], **PRIVATE)
    app.load(on_device, None, [predict, plot, info], queue=False, **PRIVATE)
    model_key.change(on_device, None, [predict, plot, info], queue=False, **PRIVATE)

    def explore(request: gr.Request = None) -> dict:
        """The predicted step time for every recompute split (0: copy all K/V, 1: recompute all) for the loaded
        model under this client's applied placement and shape, the scheduler's auto choice, KVPR's rule and the
        measured runs of that shape. GPU only: on a CPU there is nothing for the predictions to mean."""
        result = _explore(session, owner(request))
        return {"placement": result.placement, "splits": list(result.splits), "predicted_ms": list(result.predicted_ms),
                "floor_ms": list(result.floor_ms), "auto_split": result.auto_split, "auto_ms": result.auto_ms,
                "auto_reason": result.auto_reason, "paper_split": result.paper_split,
                "offloaded_tokens": result.offloaded_tokens, "note": result.note,
                "measured": [{"run_id": p.run_id, "split": p.split, "step_ms": p.step_ms} for p in result.measured]}

    endpoint(explore, api_name="explore", output="curve")
