"""The numbers behind `ehrplan data stats`, truncation counts and data-shaped batch dimensions.

No torch. Percentiles are ``numpy.percentile(..., method="inverted_cdf")``: each is a value
that occurs in the data (a visit count, a code count), not an interpolation.

Truncation, as `ehrplan.data.dataset` applies it: a patient keeps the most recent
``max_visits`` visits (the oldest are dropped), and a kept visit keeps its first
``max_codes_per_visit`` events in time order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from ehrplan.data.cohort import DEFAULT_WINDOW_HOURS, Cohort, load_cohort
from ehrplan.data.sampler import batches

if TYPE_CHECKING:
    from ehrplan.plan.config import EHRModelConfig


def summary(x: np.ndarray) -> dict[str, float | int]:
    """mean, p50, p95 and max of a non-empty integer array."""
    if len(x) == 0:
        return {"mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    return {
        "mean": round(float(np.mean(x)), 3),
        "p50": int(np.percentile(x, 50, method="inverted_cdf")),
        "p95": int(np.percentile(x, 95, method="inverted_cdf")),
        "max": int(np.max(x)),
    }


def kept_visits(cohort: Cohort, max_visits: int) -> np.ndarray:
    """bool [V]: the visits a patient keeps under ``max_visits`` (its most recent ones)."""
    nv = cohort.visits_per_patient()
    last = np.repeat(cohort.visit_offsets[1:] - 1, nv)
    return (last - np.arange(cohort.num_visits)) < max_visits


@dataclass(frozen=True)
class Truncation:
    """What ``max_visits`` / ``max_codes_per_visit`` cut from a set of patients."""

    max_visits: int
    max_codes_per_visit: int
    patients: int
    patients_truncated: int
    """patients with more visits than max_visits"""
    visits: int
    visits_dropped: int
    """the oldest visits of those patients"""
    visits_truncated: int
    """kept visits with more codes than max_codes_per_visit"""
    events: int
    events_dropped: int
    """events lost either way"""
    labelled_visits_dropped: int | None
    """None where the data carries no visit labels (the example cache)"""

    @property
    def events_dropped_fraction(self) -> float:
        return self.events_dropped / self.events if self.events else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"events_dropped_fraction": round(self.events_dropped_fraction, 6)}


def truncation(
    cohort: Cohort, patients: np.ndarray, max_visits: int, max_codes_per_visit: int
) -> Truncation:
    """Count what truncation to the given maxima drops from ``patients``."""
    keep_v = kept_visits(cohort, max_visits)
    stage = getattr(cohort, "stage", None)  # visit labels: an in-memory cohort read with them
    in_set = np.zeros(cohort.num_patients, dtype=bool)
    in_set[patients] = True
    nv = cohort.visits_per_patient()
    sel = np.repeat(in_set, nv)
    cpv = cohort.codes_per_visit()
    kept_codes = np.where(keep_v, np.minimum(cpv, max_codes_per_visit), 0)
    return Truncation(
        max_visits=max_visits,
        max_codes_per_visit=max_codes_per_visit,
        patients=int(in_set.sum()),
        patients_truncated=int((in_set & (nv > max_visits)).sum()),
        visits=int(sel.sum()),
        visits_dropped=int((sel & ~keep_v).sum()),
        visits_truncated=int((sel & keep_v & (cpv > max_codes_per_visit)).sum()),
        events=int(cpv[sel].sum()),
        events_dropped=int(cpv[sel].sum() - kept_codes[sel].sum()),
        labelled_visits_dropped=(
            int((sel & ~keep_v & (stage >= 0)).sum()) if stage is not None else None
        ),
    )


def patient_shapes(
    cohort: Cohort, max_visits: int, max_codes_per_visit: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patient, after truncation: kept visits, largest kept visit, kept codes."""
    keep_v = kept_visits(cohort, max_visits)
    kept_codes = np.where(keep_v, np.minimum(cohort.codes_per_visit(), max_codes_per_visit), 0)
    starts = cohort.visit_offsets[:-1]
    nv = np.minimum(cohort.visits_per_patient(), max_visits)
    widest = np.maximum.reduceat(kept_codes, starts) if len(starts) else np.zeros(0, int)
    real = np.add.reduceat(kept_codes, starts) if len(starts) else np.zeros(0, int)
    return nv, widest, real


def length_key(nv: np.ndarray, widest: np.ndarray) -> np.ndarray:
    """The bucketing sort key: kept visits first, then the largest kept visit."""
    return nv.astype(np.int64) * (int(widest.max(initial=0)) + 1) + widest


def batch_dims(
    cohort: Cohort,
    patients: np.ndarray,
    batch_size: int,
    max_visits: int,
    max_codes_per_visit: int,
    *,
    bucketing: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Data-shaped batch dimensions of batches of whole patients: the V and C each batch pads
    to, over one epoch (`shape_dims`)."""
    nv, widest, real = patient_shapes(cohort, max_visits, max_codes_per_visit)
    return shape_dims(
        nv[patients],
        widest[patients],
        real[patients],
        batch_size,
        max_visits,
        max_codes_per_visit,
        bucketing=bucketing,
        seed=seed,
    )


def shape_dims(
    nv: np.ndarray,
    widest: np.ndarray,
    real: np.ndarray,
    batch_size: int,
    max_visits: int,
    max_codes_per_visit: int,
    *,
    bucketing: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Data-shaped batch dimensions: the V and C each batch pads to, over one epoch, for items
    (patients or packed sequences) of ``nv`` kept visits, ``widest`` kept codes in their widest
    visit and ``real`` kept codes in all.

    For the memory estimator: p50/p95/max of V (visits) and C (codes per visit) and of the
    padded positions B*V*C per batch, against the preset's fully padded B*max_visits*max_codes.
    Also the padding ratios (padded positions / real codes) of per-batch padding and of padding
    to the preset maxima.
    """
    bs = batches(length_key(nv, widest), batch_size, shuffle=True, bucketing=bucketing, seed=seed)
    sizes = np.array([len(b) for b in bs], dtype=np.int64)
    if len(bs):  # the max of each batch: one reduceat over the batches laid end to end
        order = np.concatenate(bs)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        v = np.maximum.reduceat(nv[order], starts).astype(np.int64)
        c = np.maximum.reduceat(widest[order], starts).astype(np.int64)
    else:
        v = c = np.zeros(0, dtype=np.int64)
    padded = sizes * v * c  # positions each batch allocates: B x V x C
    full = sizes * max_visits * max_codes_per_visit  # padding to the preset maxima
    n_real = int(real.sum())
    return {
        "batch_size": batch_size,
        "bucketing": bucketing,
        "batches": len(bs),
        "visits": summary(v),
        "codes_per_visit": summary(c),
        "positions": summary(padded),
        "positions_at_preset_maxima": int(full.max(initial=0)),
        "real_codes": n_real,
        "padding_ratio": round(float(padded.sum()) / n_real, 4) if n_real else None,
        "padding_ratio_preset_maxima": round(float(full.sum()) / n_real, 4) if n_real else None,
    }


def label_balance(cohort: Cohort, patients: np.ndarray | None = None) -> dict[str, Any]:
    """Stage counts of labelled visits, the share of seen stage changes, time-to-event."""
    sel = np.ones(cohort.num_visits, dtype=bool)
    if patients is not None:
        in_set = np.zeros(cohort.num_patients, dtype=bool)
        in_set[patients] = True
        sel = np.repeat(in_set, cohort.visits_per_patient())
    lab = sel & (cohort.stage >= 0)
    stages = cohort.stage[lab]
    counts = np.bincount(stages) if len(stages) else np.zeros(0, int)
    tte = cohort.time_to_event[lab]
    return {
        "labelled_visits": int(lab.sum()),
        "stage_counts": {str(i): int(n) for i, n in enumerate(counts)},
        "event_observed": int(cohort.event_observed[lab].sum()),
        "censored": int((~cohort.event_observed[lab]).sum()),
        "time_to_event_days": {
            "p50": round(float(np.median(tte)), 1) if len(tte) else None,
            "max": round(float(tte.max()), 1) if len(tte) else None,
        },
    }


def describe(cohort: Cohort, vocab_size: int | None = None) -> dict[str, Any]:
    """patients, events, visits per patient, codes per visit, splits, label balance."""
    names, counts = np.unique(cohort.split, return_counts=True)
    splits = {str(s): int(n) for s, n in zip(names, counts, strict=True)}
    return {
        "root": cohort.root,
        "files": len(cohort.files),
        "patients": cohort.num_patients,
        "events": cohort.num_events,
        "visits": cohort.num_visits,
        "visit_window_hours": cohort.window_hours,
        "visits_per_patient": summary(cohort.visits_per_patient()),
        "codes_per_visit": summary(cohort.codes_per_visit()),
        "distinct_codes": int(pc.count_distinct(cohort.code).as_py()),
        "vocab_size": vocab_size,
        "patients_by_split": splits,
        "labels": label_balance(cohort) if cohort.label_files else None,
        "reader": dict(cohort.report),
    }


def data_batch_dims(
    root: str | Path,
    config: EHRModelConfig,
    *,
    labels: str | Path | None = None,
    window_hours: float = DEFAULT_WINDOW_HOURS,
    split: str = "train",
    bucketing: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The batch dimensions ``config`` meets on a MEDS data set (its batch size and maxima).

    For a data-shaped memory estimate: use ``visits["p95"]``/``["max"]`` and
    ``codes_per_visit["p95"]``/``["max"]`` in place of max_visits / max_codes_per_visit.
    """
    cohort = load_cohort(root, labels, window_hours=window_hours)
    return batch_dims(
        cohort,
        cohort.patients_in(split),
        config.batch_size,
        config.max_visits,
        config.max_codes_per_visit,
        bucketing=bucketing,
        seed=seed,
    )
