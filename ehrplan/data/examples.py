"""Label rows -> examples, cut at prediction time (numpy, no torch, no row loops).

This is the one definition of what a model sees for a label. For each label row (``subject_id``,
``prediction_time``) of a task (`ehrplan.data.tasks`):

1. The subject's events with ``time <= prediction_time`` (MEDS: data up to and including the
   prediction time may be used), grouped into the cohort's visits (`ehrplan.data.cohort`: a gap
   of more than the visit window starts a new visit; static null-time events join the first
   visit). A prediction time inside a visit cuts that visit: its later events are not seen.
2. Truncated to ``max_visits`` x ``max_codes_per_visit``: the most recent ``max_visits - 1``
   visits plus the subject's first visit (the static/birth visit, which holds the demographics),
   or all visits when they fit; each kept visit keeps its first ``max_codes_per_visit`` events
   (static events come first in the first visit, so they are kept).
3. One example per label row: none is dropped or overwritten, except rows whose subject has no
   event at or before the prediction time (``labels_before_first_event``) and rows for subjects
   the data does not hold (``labels_unknown_subject``); both are counted, and a task none of whose
   rows match a subject is an error.

`Examples` holds them as offsets into the cohort's CSR arrays: example ``i`` is the visits
``[first_visit[p]] if keep_first[i]`` followed by ``recent_start[i] .. last_visit[i]`` of patient
``patient[i]``, the last one cut to ``last_events[i]`` events. The label of example ``i`` is
``value[i]`` (plus ``days``/``observed`` for the CKD composite); ``label_row[i]`` is its row in
the task's files.

Sequences (`pack`). The models are causal over visits: their output at visit ``k`` depends on
visits ``<= k`` only. So examples of one patient whose windows are prefixes of the same window
(``keep_first`` False) and which end on a whole visit can share one forward pass, each read at
its own visit: `pack` groups them into sequences, exactly (same inputs, same outputs), and
leaves every other example a sequence of its own. Training and prediction iterate sequences;
metrics and prediction files count examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ehrplan.data.cohort import Cohort
from ehrplan.data.tasks import TaskLabels
from ehrplan.errors import DataError


@dataclass(frozen=True)
class Examples:
    """One example per kept label row (see the module docstring)."""

    task: str
    kind: str
    max_visits: int
    max_codes_per_visit: int
    patient: np.ndarray
    """int64 [N]: cohort patient index."""
    last_visit: np.ndarray
    """int64 [N]: global index of the visit holding the prediction time's last event."""
    last_events: np.ndarray
    """int64 [N]: events of that visit at or before the prediction time (before the code cap)."""
    recent_start: np.ndarray
    """int64 [N]: global index of the first visit of the recent window."""
    keep_first: np.ndarray
    """bool [N]: the patient's first visit is kept in front of a recent window that skips it."""
    label_row: np.ndarray
    """int64 [N]: the row of the label files (in file order) each example comes from."""
    value: np.ndarray
    """The label: bool (binary), int64 (multiclass, CKD stage), float64 (regression)."""
    prediction_time: np.ndarray
    """int64 [N]: microseconds."""
    subject_id: np.ndarray
    """int64 [N]."""
    days: np.ndarray | None = None
    observed: np.ndarray | None = None
    report: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patient)

    def visits_kept(self) -> np.ndarray:
        """int64 [N]: visits each example keeps."""
        return self.last_visit - self.recent_start + 1 + self.keep_first

    def in_split(self, cohort: Cohort, split: str) -> np.ndarray:
        """Indices of the examples whose patient is in ``split``."""
        return np.flatnonzero(cohort.split[self.patient] == split)


def _patient_index(cohort: Cohort, subject_id: np.ndarray) -> np.ndarray:
    """Cohort patient index of each subject id, -1 where the cohort has none."""
    order = np.argsort(cohort.subject_ids, kind="stable")
    ids = cohort.subject_ids[order]
    pos = np.minimum(np.searchsorted(ids, subject_id), max(len(ids) - 1, 0))
    found = (ids[pos] == subject_id) if len(ids) else np.zeros(len(subject_id), bool)
    return np.where(found, order[pos], -1)


def _events_until(cohort: Cohort, pidx: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Global end (exclusive) of each patient's events with time <= t: a binary search inside
    each label's patient's events (sorted by time), all labels a step at a time, so its cost
    grows with the labels and the log of the longest patient, never with all events."""
    assert cohort.event_time is not None
    et = cohort.event_time
    lo = cohort.event_offsets[cohort.visit_offsets[pidx]].astype(np.int64)
    hi = cohort.event_offsets[cohort.visit_offsets[pidx + 1]].astype(np.int64)
    todo = np.flatnonzero(lo < hi)
    while len(todo):
        mid = (lo[todo] + hi[todo]) // 2
        right = et[mid] <= t[todo]  # the cut is after mid
        lo[todo[right]] = mid[right] + 1
        hi[todo[~right]] = mid[~right]
        todo = todo[lo[todo] < hi[todo]]
    return lo


def build_examples(
    cohort: Cohort, labels: TaskLabels, max_visits: int, max_codes_per_visit: int
) -> Examples:
    """One example per label row of ``labels`` over ``cohort`` (see the module docstring)."""
    if max_visits < 1 or max_codes_per_visit < 1:
        raise DataError("max_visits and max_codes_per_visit must be at least 1")
    if cohort.event_time is None:
        raise DataError(f"{cohort.root}: the cohort was read without event times")
    pidx = _patient_index(cohort, labels.subject_id)
    known = pidx >= 0
    if not known.any():
        raise DataError(
            f"{labels.files[0]}: none of the {len(labels):,} label rows names a subject of "
            f"{cohort.root} (e.g. subject {int(labels.subject_id[0])})"
        )
    p = pidx[known]
    rows = np.flatnonzero(known)
    e_end = _events_until(cohort, p, labels.prediction_time[known])
    pe0 = cohort.event_offsets[cohort.visit_offsets[p]]
    seen = e_end > pe0
    p, rows, e_end = p[seen], rows[seen], e_end[seen]
    last = np.searchsorted(cohort.event_offsets, e_end - 1, side="right") - 1
    last_events = e_end - cohort.event_offsets[last]
    v0 = cohort.visit_offsets[p]
    n_vis = last - v0 + 1
    over = n_vis > max_visits
    keep_first = over & (max_visits >= 2)
    recent_start = np.where(over, last - max_visits + 1 + keep_first, v0)
    ex = Examples(
        task=labels.name,
        kind=labels.kind,
        max_visits=max_visits,
        max_codes_per_visit=max_codes_per_visit,
        patient=p.astype(np.int64),
        last_visit=last.astype(np.int64),
        last_events=last_events.astype(np.int64),
        recent_start=recent_start.astype(np.int64),
        keep_first=keep_first,
        label_row=rows.astype(np.int64),
        value=labels.value[rows],
        prediction_time=labels.prediction_time[rows],
        subject_id=labels.subject_id[rows],
        days=labels.days[rows] if labels.days is not None else None,
        observed=labels.observed[rows] if labels.observed is not None else None,
        report={
            "label_rows": len(labels),
            "labels_unknown_subject": int((~known).sum()),
            "labels_before_first_event": int((~seen).sum()),
            "examples": len(rows),
        },
    )
    return ex


@dataclass(frozen=True)
class Loss:
    """What truncation cut from a set of examples (events and visits before prediction time)."""

    examples: int
    events: int
    events_dropped: int
    visits: int
    visits_dropped: int
    visits_cut: int
    """kept visits with more events than max_codes_per_visit"""

    @property
    def events_dropped_fraction(self) -> float:
        return self.events_dropped / self.events if self.events else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "events": self.events,
            "events_dropped": self.events_dropped,
            "events_dropped_fraction": round(self.events_dropped_fraction, 6),
            "visits": self.visits,
            "visits_dropped": self.visits_dropped,
            "visits_cut": self.visits_cut,
        }


_CHUNK = 1 << 16
"""Examples per pass of `truncation_loss`: its per-example temporaries stay a few MiB, whatever
the data set's size."""


def _capped_counts(cohort: Cohort, C: int) -> np.ndarray:
    """Per visit: events kept under the code cap ``C``, in the smallest integer type that holds
    ``C`` (the range maxima's table is several copies of it)."""
    eo = cohort.event_offsets
    dtype = np.int16 if C < 2**15 else np.int64
    return np.minimum(eo[1:] - eo[:-1], C).astype(dtype)


def _shapes(
    cohort: Cohort, ex: Examples, idx: np.ndarray, capped: np.ndarray, *, sums: bool = True
) -> dict[str, np.ndarray]:
    """Per example of ``idx``: visits, kept visits and the widest kept visit; with ``sums``,
    events before the cut, kept events and the visits cut by the code cap (prefix sums over the
    cohort's visits). ``capped``: `_capped_counts`."""
    C = ex.max_codes_per_visit
    eo = cohort.event_offsets
    p, last, rs = ex.patient[idx], ex.last_visit[idx], ex.recent_start[idx]
    kf, le = ex.keep_first[idx], ex.last_events[idx]
    v0 = cohort.visit_offsets[p]
    first_cap = np.where(kf, capped[v0], 0)
    widest = np.maximum(np.minimum(le, C), first_cap)
    if len(idx):  # the widest whole visit of each window: a running max over ranges
        widest = np.maximum(widest, _range_max(capped, rs, last))
    out = {"visits": last - v0 + 1, "visits_kept": last - rs + 1 + kf, "widest": widest}
    if sums:
        cum_cap = np.concatenate([[0], np.cumsum(capped)])
        cum_cut = np.concatenate([[0], np.cumsum(eo[1:] - eo[:-1] > C)])
        first_cut = np.where(kf, eo[v0 + 1] - eo[v0] > C, 0)
        out |= {
            "events": eo[last] - eo[v0] + le,
            "kept": cum_cap[last] - cum_cap[rs] + np.minimum(le, C) + first_cap,
            "cut": cum_cut[last] - cum_cut[rs] + (le > C) + first_cut,
        }
    return out


def _range_max(x: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """max(x[start:stop]) per range (0 for an empty one): a sparse table of maxima over
    power-of-two spans, two look-ups per range."""
    out = np.zeros(len(start), dtype=x.dtype)
    n = stop - start
    ok = n > 0
    if not ok.any():
        return out
    levels = [x]
    while (1 << len(levels)) <= int(n.max()):
        prev, h = levels[-1], 1 << (len(levels) - 1)
        levels.append(np.maximum(prev[:-h], prev[h:]) if len(prev) > h else prev[:0])
    s, m = start[ok], n[ok]
    j = np.floor(np.log2(m)).astype(np.int64)
    res = np.zeros(len(s), dtype=x.dtype)
    for lv in np.unique(j):
        sel = j == lv
        table = levels[int(lv)]
        res[sel] = np.maximum(table[s[sel]], table[s[sel] + m[sel] - (1 << int(lv))])
    out[ok] = res
    return out


def truncation_loss(cohort: Cohort, ex: Examples, idx: np.ndarray | None = None) -> Loss:
    """Events and visits before prediction time that truncation drops, over ``idx`` (summed
    `_CHUNK` examples at a time)."""
    idx = np.arange(len(ex)) if idx is None else idx
    capped = _capped_counts(cohort, ex.max_codes_per_visit)
    keys = ("events", "kept", "visits", "visits_kept", "cut")
    tot = dict.fromkeys(keys, 0)
    for at in range(0, len(idx), _CHUNK):
        s = _shapes(cohort, ex, idx[at : at + _CHUNK], capped)
        for k in keys:
            tot[k] += int(s[k].sum())
    return Loss(
        examples=len(idx),
        events=tot["events"],
        events_dropped=tot["events"] - tot["kept"],
        visits=tot["visits"],
        visits_dropped=tot["visits"] - tot["visits_kept"],
        visits_cut=tot["cut"],
    )


@dataclass(frozen=True)
class Sequences:
    """Forward passes: each a window of one example (its host) and the examples read from it.

    Sequence ``s`` is the window of example ``host[s]``; its examples are
    ``members[offsets[s]:offsets[s+1]]`` at visit positions ``position[...]`` (distinct, in
    increasing order, the host last)."""

    host: np.ndarray
    offsets: np.ndarray
    members: np.ndarray
    position: np.ndarray

    def __len__(self) -> int:
        return len(self.host)


def pack(cohort: Cohort, ex: Examples, idx: np.ndarray) -> Sequences:
    """Group the examples ``idx`` into sequences, exactly (see the module docstring)."""
    idx = np.asarray(idx, dtype=np.int64)
    eo, k = cohort.event_offsets, ex.last_visit[idx]
    whole = ex.last_events[idx] == eo[k + 1] - eo[k]
    prefix = ~ex.keep_first[idx] & (ex.recent_start[idx] == cohort.visit_offsets[ex.patient[idx]])
    p = ex.patient[idx]
    # order: patient, then last visit, then events (the longest cut last), then label row
    order = np.lexsort((ex.label_row[idx], ex.last_events[idx], k, ~prefix, p))
    i_sorted = idx[order]
    p_s, k_s, pre_s, whole_s = p[order], k[order], prefix[order], whole[order]
    del order, p, k, prefix, whole  # the peak of a large split is these arrays: free them early
    n = len(i_sorted)
    # the host of a patient's prefix examples: its last prefix example in this order
    grp_end = np.ones(n, dtype=bool)
    if n:
        grp_end[:-1] = (p_s[1:] != p_s[:-1]) | (pre_s[1:] != pre_s[:-1])
    ends = np.flatnonzero(grp_end)
    host_at = ends[np.cumsum(grp_end) - grp_end]  # the first group end at or after each one
    del ends
    # one example per visit can be read from it: the longest cut (last in this order)
    last_of_visit = np.ones(n, dtype=bool)
    if n:
        last_of_visit[:-1] = (p_s[1:] != p_s[:-1]) | (k_s[1:] != k_s[:-1])
    joins = pre_s & whole_s & last_of_visit & (k_s < k_s[host_at]) & ~grp_end
    seq_of = np.where(joins, host_at, np.arange(n))  # sorted position of each one's sequence
    hosts = np.flatnonzero(~joins)  # = np.unique(seq_of): a joining example's host never joins
    del host_at, last_of_visit, whole_s, pre_s, p_s
    seq_index = np.searchsorted(hosts, seq_of)
    del seq_of
    # by sequence, then visit: a sequence's members already come in visit order here (one per
    # visit, the host last), so a stable sort on the sequence alone is that order
    by_seq = np.argsort(seq_index, kind="stable")
    members = i_sorted[by_seq]
    counts = np.bincount(seq_index, minlength=len(hosts))
    host_ex = i_sorted[hosts]
    # slot 0 of a window that keeps the first visit in front is that visit; the recent window
    # starts at slot keep_first
    slot0 = ex.recent_start[host_ex] - ex.keep_first[host_ex]
    pos = ex.last_visit[members] - np.repeat(slot0, counts)
    return Sequences(
        host=host_ex,
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        members=members,
        position=pos.astype(np.int64),
    )


def example_shapes(cohort: Cohort, ex: Examples, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Per example of ``idx``: ``events`` before the cut, ``kept`` events, ``visits``,
    ``visits_kept``, the ``widest`` kept visit and the visits ``cut`` by the code cap."""
    return _shapes(cohort, ex, idx, _capped_counts(cohort, ex.max_codes_per_visit))


def sequence_shapes(cohort: Cohort, ex: Examples, seq: Sequences) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence: kept visits and the widest kept visit (the bucketing key's parts)."""
    s = _shapes(cohort, ex, seq.host, _capped_counts(cohort, ex.max_codes_per_visit), sums=False)
    return s["visits_kept"], s["widest"]


def ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(s, s + n)`` for each (s, n), and each element's offset in its range."""
    total = int(lengths.sum())
    group_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    within = np.arange(total) - group_start
    return np.repeat(starts, lengths) + within, within


@dataclass(frozen=True)
class Slots:
    """The visits a batch of sequences holds, slot by slot (what collate pads)."""

    visits: np.ndarray
    """int64 [S]: global visit index of each slot (sequence-major, slot order)."""
    slot: np.ndarray
    """int64 [S]: the slot's position in its sequence."""
    row: np.ndarray
    """int64 [S]: the slot's sequence in the batch."""
    codes: np.ndarray
    """int64 [S]: events the slot keeps (capped; the last slot cut at the prediction time)."""
    per_sequence: np.ndarray
    """int64 [B]: slots of each sequence."""

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, V, C) of the padded batch."""
        B = len(self.per_sequence)
        V = max(int(self.per_sequence.max(initial=1)), 1)
        return B, V, max(int(self.codes.max(initial=1)), 1)


def slots(cohort: Cohort, ex: Examples, seq: Sequences, items: np.ndarray) -> Slots:
    """The slots of sequences ``items``: the first visit (when kept in front), then the recent
    window; each visit's first ``max_codes_per_visit`` events, the last one cut. Work in the
    batch's slots only (no pass over the cohort's visits)."""
    s = np.asarray(items, dtype=np.int64)
    h = seq.host[s]
    kf = ex.keep_first[h]
    nv = ex.last_visit[h] - ex.recent_start[h] + 1 + kf
    visits, v_local = ranges(ex.recent_start[h] - kf, nv)
    last_slot = np.cumsum(nv) - 1
    if kf.any():
        visits[(last_slot - nv + 1)[kf]] = cohort.visit_offsets[ex.patient[h[kf]]]
    eo = cohort.event_offsets
    ncodes = eo[visits + 1] - eo[visits]
    ncodes[last_slot] = ex.last_events[h]
    np.minimum(ncodes, ex.max_codes_per_visit, out=ncodes)
    return Slots(
        visits=visits,
        slot=v_local,
        row=np.repeat(np.arange(len(s)), nv),
        codes=ncodes,
        per_sequence=nv,
    )
