"""Events -> visits -> labels: a MEDS data set as flat numpy arrays (no torch, no row loops).

Visits. Events of one subject form a visit while each is within ``window_hours`` (default 24) of
the previous one; a longer gap starts a new visit (gap-based sessionisation, vectorised: one
comparison per event). Static events (null ``time``, e.g. ``GENDER//F``) join the subject's first
timed visit; a subject with only static events has no visits and is counted, not kept.

Time features per visit, from visit start times (before any truncation), scaled as
``log1p(days) / log1p(365)`` (0 on the same day, 1 at a year, about 1.4 at ten years): days since
the previous visit (0 for the first) and days since the subject's first visit.

Labels. A label row (``subject_id``, ``prediction_time``) attaches to the subject's last visit
that ended at or before ``prediction_time`` (MEDS: data up to and including that time may be
used); a later row for the same visit replaces an earlier one; rows before the first visit are
counted and dropped. ``integer_value`` is the stage (a binary ``boolean_value`` task serves when
there is no ``integer_value``); ``float_value`` is the days to the next stage change and
``boolean_value`` whether it was seen (False: censored), as `ehrplan synth` writes them. A visit
without a label has stage -100 (ignored by the loss), time-to-event 0 and event_observed False.

Splits come from ``metadata/subject_splits.parquet`` (its names mapped by ``split_names``);
without that file, 80/10/10 by a hash of ``subject_id`` (`hashed_splits`); a subject the file does
not list has split ``""`` (used by no split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ehrplan.data import meds
from ehrplan.errors import DataError

IGNORE_INDEX = -100  # the stage of an unlabelled or padded visit (matches ehrplan.runtime.batch)
US_PER_DAY = 86_400_000_000
DEFAULT_WINDOW_HOURS = 24.0
DEFAULT_TASK = Path("tasks") / "ckd_stage"
_TIME_SCALE = float(np.log1p(365.0))  # log1p(days) / log1p(365): 1.0 at one year


def scale_days(days: np.ndarray) -> np.ndarray:
    """The time-feature scaling: ``log1p(days) / log1p(365)``."""
    return (np.log1p(np.maximum(days, 0.0)) / _TIME_SCALE).astype(np.float32)


@dataclass
class Cohort:
    """Patients -> visits -> events as CSR-style offset arrays, in data-file order."""

    root: str
    subject_ids: np.ndarray
    """int64 [P]."""
    split: np.ndarray
    """str [P]: train / tuning / held_out (or any split name the data uses; "" if unlisted)."""
    visit_offsets: np.ndarray
    """int64 [P+1]: patient p's visits are visit_offsets[p]:visit_offsets[p+1]."""
    visit_start: np.ndarray
    """int64 [V]: microseconds."""
    visit_end: np.ndarray
    """int64 [V]: microseconds (the visit's last event)."""
    event_offsets: np.ndarray
    """int64 [V+1]: visit v's events are event_offsets[v]:event_offsets[v+1]."""
    code: pa.Array
    """string [E]: the raw MEDS codes, in visit order."""
    numeric_value: np.ndarray
    """float32 [E]: NaN where none."""
    event_subject: np.ndarray
    """int64 [E]: each event's subject_id (for round-trip checks)."""
    time_features: np.ndarray
    """float32 [V, 2]: scaled days since the previous visit and since the first visit."""
    stage: np.ndarray
    """int64 [V]: -100 where no label."""
    time_to_event: np.ndarray
    """float32 [V]: days."""
    event_observed: np.ndarray
    """bool [V]."""
    window_hours: float
    files: tuple[str, ...]
    label_files: tuple[str, ...] = ()
    report: dict[str, int] = field(default_factory=dict)
    """Counts of what was dropped or merged: static-only subjects, unmatched labels, ..."""
    event_time: np.ndarray | None = None
    """int64 [E]: each event's time in microseconds (a static event: its subject's first timed
    event's time), for cutting examples at a label's prediction time."""

    @property
    def num_patients(self) -> int:
        return len(self.subject_ids)

    @property
    def num_visits(self) -> int:
        return len(self.visit_start)

    @property
    def num_events(self) -> int:
        return len(self.code)

    def visits_per_patient(self) -> np.ndarray:
        return np.diff(self.visit_offsets)

    def codes_per_visit(self) -> np.ndarray:
        return np.diff(self.event_offsets)

    def patients_in(self, split: str | None) -> np.ndarray:
        """Indices of the patients of one split (all patients for None)."""
        if split is None:
            return np.arange(self.num_patients)
        return np.flatnonzero(self.split == split)

    def event_mask(self, patients: np.ndarray) -> np.ndarray:
        """bool [E]: the events of the given patients."""
        per_patient = np.zeros(self.num_patients, dtype=bool)
        per_patient[patients] = True
        return np.repeat(per_patient, self.events_per_patient())

    def events_per_patient(self) -> np.ndarray:
        return np.diff(self.event_offsets[self.visit_offsets])


HASH_SPLITS = (("train", 8), ("tuning", 1), ("held_out", 1))  # tenths of the subjects


def hashed_splits(subject_ids: np.ndarray) -> np.ndarray:
    """80/10/10 train/tuning/held_out by a hash of ``subject_id`` (splitmix64's finaliser, mod
    10): the same subject always lands in the same split, whatever else the data holds."""
    with np.errstate(over="ignore"):
        z = subject_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    tenth = (z % np.uint64(10)).astype(np.int64)
    names = np.array([n for n, k in HASH_SPLITS for _ in range(k)], dtype=object)
    return names[tenth]


def parse_split_names(text: str | None) -> dict[str, str] | None:
    """``--splits train=train,tuning=val,held_out=test`` -> {ours: the file's}."""
    if not text:
        return None
    out: dict[str, str] = {}
    for item in text.split(","):
        ours, eq, theirs = item.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not eq or ours not in ("train", "tuning", "held_out") or not theirs:
            raise DataError(
                f"--splits {text}: expected train=NAME,tuning=NAME,held_out=NAME (got '{item}')"
            )
        out[ours] = theirs
    return out


def _fill_static_times(sid: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give null-time events their subject's first timed event's time; mask of events kept."""
    null = t == meds.NULL_TIME
    if not null.any():
        return t, np.ones(len(t), dtype=bool)
    n = len(t)
    idx = np.where(~null, np.arange(n), n)
    nxt = np.minimum.accumulate(idx[::-1])[::-1]  # next timed event at or after each position
    ok = nxt < n
    ok[ok] = sid[nxt[ok]] == sid[ok]
    t = t.copy()
    t[null & ok] = t[nxt[null & ok]]
    return t, ~null | ok


def load_cohort(
    root: str | Path,
    labels: str | Path | None = None,
    *,
    window_hours: float = DEFAULT_WINDOW_HOURS,
    visit_labels: bool = True,
    split_names: dict[str, str] | None = None,
) -> Cohort:
    """Read a MEDS data set (and a label task, if any) into visits.

    ``labels``: a label file or task directory; None looks for ``ROOT/tasks/ckd_stage`` and
    goes without labels when it is absent. ``visit_labels=False`` attaches none: training and
    prediction cut one example per label row instead (`ehrplan.data.examples`).
    ``split_names``: ours -> the file's, e.g. ``{"tuning": "val", "held_out": "test"}``.
    """
    if window_hours <= 0:
        raise DataError(f"the visit window must be positive (got {window_hours} hours)")
    root = Path(root)
    ev = meds.read_events(root)
    cohort = build_cohort(
        str(root),
        ev.subject_id,
        ev.time,
        ev.code,
        ev.numeric_value,
        split_map=meds.read_splits(root),
        window_hours=window_hours,
        files=ev.files,
        split_names=split_names,
    )
    label_path = Path(labels) if labels is not None else root / DEFAULT_TASK
    if visit_labels and (labels is not None or label_path.exists()):
        attach_labels(cohort, label_path, known=np.unique(ev.subject_id))
    return cohort


def build_cohort(
    root: str,
    sid: np.ndarray,
    time: np.ndarray,
    code: pa.Array,
    value: np.ndarray,
    *,
    split_map: dict[int, str] | None,
    window_hours: float,
    files: tuple[str, ...] = (),
    split_names: dict[str, str] | None = None,
) -> Cohort:
    """Visits, time features and splits from events in file order (every subject's events
    together and sorted by time): a whole data set, or one of its files."""
    report: dict[str, int] = {}
    t, keep = _fill_static_times(sid, time)
    report["events_read"] = len(sid)
    report["static_only_events_dropped"] = int((~keep).sum())
    sid = sid[keep]
    t = t[keep]
    code = code.filter(pa.array(keep)) if not keep.all() else code
    value = value[keep]
    if len(sid) == 0:
        raise DataError(f"{Path(root) / meds.DATA_DIR}: no timed events (only static ones)")

    # visits: a new one where the subject changes or the gap exceeds the window
    new_subject = np.ones(len(sid), dtype=bool)
    new_subject[1:] = sid[1:] != sid[:-1]
    new_visit = new_subject.copy()
    new_visit[1:] |= (t[1:] - t[:-1]) > int(window_hours * 3_600_000_000)
    visit_first = np.flatnonzero(new_visit)
    event_offsets = np.append(visit_first, len(sid)).astype(np.int64)
    visit_start = t[visit_first]
    visit_end = t[event_offsets[1:] - 1]
    visit_is_first = new_subject[visit_first]
    patient_first_visit = np.flatnonzero(visit_is_first)
    visit_offsets = np.append(patient_first_visit, len(visit_first)).astype(np.int64)
    subject_ids = sid[visit_first[patient_first_visit]]

    # time features
    nv = np.diff(visit_offsets)
    first_start = np.repeat(visit_start[patient_first_visit], nv)
    prev = np.empty_like(visit_start)
    prev[0] = visit_start[0]
    prev[1:] = visit_start[:-1]
    since_prev = np.where(visit_is_first, 0, visit_start - prev) / US_PER_DAY
    since_first = (visit_start - first_start) / US_PER_DAY
    time_features = np.stack([scale_days(since_prev), scale_days(since_first)], axis=1)

    # splits
    if split_map is None:
        split = hashed_splits(subject_ids)
        report["splits_file_missing"] = 1
    else:
        rename = {v: k for k, v in (split_names or {}).items()}
        split = np.array(
            [rename.get(n, n) for n in (split_map.get(int(s), "") for s in subject_ids)],
            dtype=object,
        )
        report["subjects_without_split"] = int((split == "").sum())

    n_visits = len(visit_start)
    return Cohort(
        root=root,
        subject_ids=subject_ids,
        split=split,
        visit_offsets=visit_offsets,
        visit_start=visit_start,
        visit_end=visit_end,
        event_offsets=event_offsets,
        code=code,
        numeric_value=value,
        event_subject=sid,
        time_features=time_features,
        stage=np.full(n_visits, IGNORE_INDEX, dtype=np.int64),
        time_to_event=np.zeros(n_visits, dtype=np.float32),
        event_observed=np.zeros(n_visits, dtype=bool),
        window_hours=window_hours,
        files=files,
        report=report,
        event_time=t,
    )


def attach_labels(cohort: Cohort, path: Path, known: np.ndarray) -> None:
    """Join a label task onto the cohort's visits by subject and prediction time (as-of)."""
    attach_label_rows(cohort, meds.read_labels(path, known_subjects=known), path)


def attach_label_rows(cohort: Cohort, lab: meds.Labels, path: Path) -> None:
    """Join label rows (all of a task's, or those of the cohort's subjects) onto its visits."""
    vals = lab.values
    if "integer_value" in vals:
        stage = vals["integer_value"].astype(np.int64)
    elif "boolean_value" in vals:
        stage = vals["boolean_value"].astype(np.int64)
    else:
        raise DataError(
            f"{path}: labels need integer_value (a stage) or boolean_value (a binary task)"
        )
    if (stage < 0).any():
        raise DataError(f"{path}: negative integer_value labels (stages are 0, 1, 2, ...)")
    has_tte = "float_value" in vals
    tte = vals["float_value"].astype(np.float32) if has_tte else None
    if tte is not None:
        bad = ~np.isfinite(tte)
        if bad.any():
            raise DataError(
                f"{path}: {int(bad.sum())} float_value label(s) are NaN or infinite (days to the "
                "next stage change must be finite)"
            )
        if (tte < 0).any():
            raise DataError(
                f"{path}: {int((tte < 0).sum())} float_value label(s) are negative (days to the "
                f"next stage change are 0 or more; e.g. {float(tte[tte < 0][0]):g})"
            )
    observed = vals["boolean_value"] if has_tte and "boolean_value" in vals else None

    # patient index of each label (all subjects are known; static-only ones have no visits)
    order = np.argsort(cohort.subject_ids)
    pos = np.searchsorted(cohort.subject_ids[order], lab.subject_id)
    pos = np.minimum(pos, len(order) - 1)
    found = cohort.subject_ids[order][pos] == lab.subject_id
    pidx = np.where(found, order[pos], -1)
    # as-of join on (patient, time) via ranks: visit keys are sorted in cohort order
    nv = cohort.visits_per_patient()
    visit_pidx = np.repeat(np.arange(cohort.num_patients), nv)
    all_t = np.concatenate([cohort.visit_end, lab.prediction_time])
    _, rank = np.unique(all_t, return_inverse=True)
    r = int(rank.max()) + 1
    vkey = visit_pidx * r + rank[: cohort.num_visits]
    lkey = pidx * r + rank[cohort.num_visits :]
    v = np.searchsorted(vkey, lkey, side="right") - 1
    ok = found & (v >= 0)
    ok[ok] = visit_pidx[v[ok]] == pidx[ok]
    # a later label for the same visit replaces an earlier one
    idx = np.flatnonzero(ok)
    idx = idx[np.lexsort((lab.prediction_time[idx], v[idx]))]
    target = v[idx]
    last = np.ones(len(idx), dtype=bool)
    last[:-1] = target[1:] != target[:-1]
    idx, target = idx[last], target[last]
    cohort.stage[target] = stage[idx]
    if tte is not None:
        cohort.time_to_event[target] = tte[idx]
    if observed is not None:
        cohort.event_observed[target] = observed[idx]
    cohort.label_files = lab.files
    cohort.report["label_rows"] = len(lab)
    cohort.report["label_rows_before_first_visit"] = int((~ok).sum())
    cohort.report["label_rows_replaced"] = int(ok.sum()) - len(idx)
    cohort.report["visits_labelled"] = len(idx)
