"""Evaluation metrics over every real visit of a split (no torch here: numpy in, floats out).

Stage (5-class, ordinal): accuracy, macro-F1, macro one-vs-rest AUROC and quadratic-weighted
Cohen's kappa, all from scikit-learn. Time to progression: Harrell's concordance index from
lifelines (censoring-aware: a censored visit is only compared with visits that progressed
earlier), and the mean absolute error in days on visits whose progression was observed (on a
censored visit the true time is unknown, so an error cannot be computed there).

Baselines beside them, so a number can be read: the majority stage of the *training* split
predicted everywhere (its accuracy and macro-F1), and 0.5 for the concordance index.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Predictions:
    """Per real visit: labels and what the model said."""

    stage: np.ndarray  # int [N]
    stage_prob: np.ndarray  # float [N, K]
    time_days: np.ndarray  # float [N]: time to event or censoring
    observed: np.ndarray  # bool [N]
    predicted_days: np.ndarray  # float [N]: predicted median time to progression


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
