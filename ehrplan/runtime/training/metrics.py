"""Evaluation metrics over every real visit of a split (no torch here: numpy in, floats out).

Stage (5-class, ordinal): accuracy, macro-F1, macro one-vs-rest AUROC and quadratic-weighted
Cohen's kappa, all from scikit-learn. Time to progression: Harrell's concordance index from
lifelines (censoring-aware: a censored visit is only compared with visits that progressed
earlier), and the mean absolute error in days on visits whose progression was observed (on a
censored visit the true time is unknown, so an error cannot be computed there).

Baselines beside them, so a number can be read: the majority stage of the *training* split
predicted everywhere (its accuracy and macro-F1), and 0.5 for the concordance index.

Other task kinds (`evaluate_task`), one row per example: binary: AUROC, AUPRC and Brier score
beside the prevalence baseline (a constant score: AUROC 0.5, AUPRC = the split's prevalence,
Brier of predicting the train prevalence); multiclass: the stage metrics above with the train
split's majority class; regression: MSE and MAE beside predicting the train mean.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Predictions:
    """Per example (labelled position): labels and what the model said."""

    stage: np.ndarray  # int [N]: class (CKD stage, multiclass, binary 0/1); 0 for regression
    stage_prob: np.ndarray  # float [N, K]: class probabilities; binary: [N, 1] P(positive)
    time_days: np.ndarray  # float [N]: time to event or censoring (CKD); regression: the target
    observed: np.ndarray  # bool [N]
    predicted_days: np.ndarray  # float [N]: CKD: predicted median days; regression: prediction
    examples: np.ndarray | None = None  # int [N]: example index of each row


def macro_auroc(y: np.ndarray, prob: np.ndarray) -> float | None:
    """Mean of one-vs-rest AUROCs over the classes that occur (and do not fill the whole split)."""
    from sklearn.metrics import roc_auc_score

    scores = [
        roc_auc_score(y == k, prob[:, k])
        for k in range(prob.shape[1])
        if 0 < int((y == k).sum()) < len(y)
    ]
    return float(np.mean(scores)) if scores else None


def concordance(
    time_days: np.ndarray, predicted_days: np.ndarray, observed: np.ndarray
) -> float | None:
    """Harrell's C (lifelines): P(predicted order of two comparable visits = true order).

    A longer predicted time should go with a longer true time, so the predicted median is the
    score as is. ``None`` when no pair is comparable (no observed event).
    """
    if not observed.any():
        return None
    from lifelines.utils import concordance_index

    try:
        return float(concordance_index(time_days, predicted_days, observed))
    except ZeroDivisionError:
        return None


def stage_metrics(y: np.ndarray, pred: np.ndarray, prob: np.ndarray | None) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kappa of a constant prediction warns and returns 0/nan
        kappa = cohen_kappa_score(y, pred, weights="quadratic")
    return {
        "stage_accuracy": float(accuracy_score(y, pred)),
        "stage_macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "stage_macro_auroc": macro_auroc(y, prob) if prob is not None else None,
        "stage_qw_kappa": None if np.isnan(kappa) else float(kappa),
    }


def evaluate_predictions(p: Predictions, majority_stage: int | None = None) -> dict[str, Any]:
    """Every metric of one split, and the baselines when ``majority_stage`` is given."""
    pred = p.stage_prob.argmax(-1)
    out = stage_metrics(p.stage, pred, p.stage_prob)
    out["c_index"] = concordance(p.time_days, p.predicted_days, p.observed)
    obs = p.observed
    out["mae_days_observed"] = (
        float(np.abs(p.predicted_days[obs] - p.time_days[obs]).mean()) if obs.any() else None
    )
    out["visits"] = len(p.stage)
    out["observed_events"] = int(obs.sum())
    if majority_stage is not None:
        base = stage_metrics(p.stage, np.full_like(p.stage, majority_stage), None)
        out["baseline_majority_stage"] = int(majority_stage)
        out["baseline_stage_accuracy"] = base["stage_accuracy"]
        out["baseline_stage_macro_f1"] = base["stage_macro_f1"]
    return out


HEADLINE = {
    "binary": ("auroc", "auprc"),
    "multiclass": ("stage_macro_f1", "stage_accuracy"),
    "regression": ("mae", "mse"),
    "ckd_progression": ("stage_macro_f1", "c_index"),
}


def binary_metrics(y: np.ndarray, prob: np.ndarray, train_prevalence: float) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = y.astype(bool)
    both = 0 < int(y.sum()) < len(y)
    prevalence = float(y.mean()) if len(y) else None
    return {
        "auroc": float(roc_auc_score(y, prob)) if both else None,
        "auprc": float(average_precision_score(y, prob)) if both else None,
        "brier": float(np.mean((prob - y) ** 2)) if len(y) else None,
        "examples": len(y),
        "positives": int(y.sum()),
        "prevalence": prevalence,
        "baseline_auroc": 0.5,
        "baseline_auprc": prevalence,
        "baseline_brier": float(np.mean((train_prevalence - y) ** 2)) if len(y) else None,
        "train_prevalence": train_prevalence,
    }


def regression_metrics(y: np.ndarray, pred: np.ndarray, train_mean: float) -> dict[str, Any]:
    err = pred - y
    return {
        "mse": float(np.mean(err**2)) if len(y) else None,
        "mae": float(np.mean(np.abs(err))) if len(y) else None,
        "examples": len(y),
        "baseline_mse": float(np.mean((train_mean - y) ** 2)) if len(y) else None,
        "baseline_mae": float(np.mean(np.abs(train_mean - y))) if len(y) else None,
        "train_mean": train_mean,
    }


def evaluate_task(p: Predictions, task: dict[str, Any]) -> dict[str, Any]:
    """The metrics of the task's kind on one split, each with its baseline."""
    kind = task.get("kind", "ckd_progression")
    if kind == "binary":
        return binary_metrics(p.stage, p.stage_prob[:, 0], float(task["train_prevalence"]))
    if kind == "regression":
        return regression_metrics(p.time_days, p.predicted_days, float(task["train_mean"]))
    if kind == "multiclass":
        pred = p.stage_prob.argmax(-1)
        out = stage_metrics(p.stage, pred, p.stage_prob)
        base = stage_metrics(p.stage, np.full_like(p.stage, task["majority_class"]), None)
        return out | {
            "examples": len(p.stage),
            "baseline_majority_stage": int(task["majority_class"]),
            "baseline_stage_accuracy": base["stage_accuracy"],
            "baseline_stage_macro_f1": base["stage_macro_f1"],
        }
    out = evaluate_predictions(p, majority_stage=task.get("majority_class"))
    return out | {"examples": len(p.stage)}


def headline(res: dict[str, Any], kind: str) -> str:
    """Two metrics of the kind for a progress line, e.g. ``AUROC 0.712 (baseline 0.500)``."""

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    parts = []
    for name in HEADLINE.get(kind, HEADLINE["ckd_progression"]):
        base = res.get(f"baseline_{name}")
        label = name.replace("stage_", "").replace("_", "-")
        label = label.upper() if label in ("auroc", "auprc", "mse", "mae") else label
        parts.append(f"{label} {f(res.get(name))}" + (f" (baseline {f(base)})" if base else ""))
    return "  ".join(parts)
