"""The numbers behind `ehrplan data stats`, truncation counts and data-shaped batch dimensions.

No torch. Percentiles are ``numpy.percentile(..., method="inverted_cdf")``: each is a value
that occurs in the data (a visit count, a code count), not an interpolation.

Whole-patient truncation (`data stats`' per-patient figures; training cuts examples, see
`ehrplan.data.examples`): a patient keeps the most recent ``max_visits`` visits (the oldest are
dropped), and a kept visit keeps its first ``max_codes_per_visit`` events in time order. Every
function here reads the cohort attributes only, so an in-memory `Cohort` and the memory-mapped
`ExampleCache` serve alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ehrplan.data.cohort import Cohort
from ehrplan.data.sampler import batches


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


def batch_maxima(
    batch_list: Sequence[Sequence[int] | np.ndarray], *values: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each batch's size and, for each array of per-item ``values``, its largest value in each
    batch (int64): one ``reduceat`` over the batches laid end to end. Batches are not empty."""
    sizes = np.array([len(b) for b in batch_list], dtype=np.int64)
    if not len(sizes):
        return sizes, [np.zeros(0, dtype=np.int64) for _ in values]
    flat = np.concatenate([np.asarray(b, dtype=np.int64) for b in batch_list])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return sizes, [np.maximum.reduceat(x[flat], starts).astype(np.int64) for x in values]


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
    sizes, (v, c) = batch_maxima(bs, nv, widest)
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
