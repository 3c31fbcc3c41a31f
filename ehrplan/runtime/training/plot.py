"""Loss and metric curves of a run as one PNG (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ehrplan.atomic import write_bytes

CURVES: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "binary": (
        ("auroc", "auprc"),
        (("baseline_auroc", "constant-score AUROC"), ("baseline_auprc", "prevalence (AUPRC)")),
    ),
    "multiclass": (
        ("stage_macro_f1", "stage_accuracy", "stage_macro_auroc"),
        (("baseline_stage_macro_f1", "majority-class macro-F1"),),
    ),
    "regression": (("mae",), (("baseline_mae", "train-mean MAE"),)),
    "ckd_progression": (
        ("stage_macro_f1", "stage_macro_auroc", "stage_qw_kappa", "c_index"),
        (("baseline_stage_macro_f1", "majority-stage macro-F1"),),
    ),
}


def plot_curves(
    records: list[dict[str, Any]], path: Path, title: str = "", kind: str = "ckd_progression"
) -> Path:
    """Training loss per step (left) and the task kind's tuning metrics per evaluation, with
    their baselines as dashed lines (right), to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("split") == "tuning"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    if steps:
        x = [r["step"] for r in steps]
        ax_loss.plot(x, [r["loss"] for r in steps], label="total", lw=1)
        if kind == "ckd_progression":
            ax_loss.plot(x, [r["stage_loss"] for r in steps], label="stage CE", lw=1)
            ax_loss.plot(x, [r["time_loss"] for r in steps], label="time NLL", lw=1)
    for name in ("loss",):
        pts = [(r["step"], r[name]) for r in evals if r.get(name) is not None]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), "o-", label="tuning loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.set_title("loss")
    names, baselines = CURVES.get(kind, CURVES["ckd_progression"])
    for name in names:
        pts = [(r["step"], r[name]) for r in evals if r.get(name) is not None]
        if pts:
            ax_metric.plot(*zip(*pts, strict=True), "o-", label=name.replace("_", " "))
    for key, label in baselines:
        base = [r.get(key) for r in evals if r.get(key) is not None]
        if base:
            ax_metric.axhline(base[-1], ls="--", lw=1, c="gray", label=label)
    ax_metric.set_xlabel("optimizer step")
    if kind != "regression":
        ax_metric.set_ylim(0, 1)
    ax_metric.legend(fontsize=8)
    ax_metric.set_title("tuning split")
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
