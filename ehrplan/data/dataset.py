"""The torch Dataset and collate: `ehrplan.runtime.batch.Batch` padded per batch, not to preset
maxima.

A batch of B patients is padded to V = its longest patient's kept visits and C = its largest
kept visit (not to ``max_visits`` x ``max_codes_per_visit``). Truncation is explicit and counted
(`EHRDataset.truncation`): a patient keeps its most recent ``max_visits`` visits, a visit its
first ``max_codes_per_visit`` events; the counts come from `ehrplan.data.stats.truncation`.

Every visit of the cohort is a visit here, labelled or not; unlabelled visits (e.g. a
``MEDS_BIRTH``-only visit) carry stage -100, which the loss ignores. Collation is vectorised
numpy (one fancy-index assignment per tensor), then ``torch.from_numpy``.
"""

from __future__ import annotations

import numpy as np
import torch

from ehrplan.data.cache import ExampleCache
from ehrplan.data.cohort import Cohort
from ehrplan.data.examples import (
    Examples,
    pack,
    sequence_shapes,
    slots,
    truncation_loss,
)
from ehrplan.data.sampler import BucketBatchSampler
from ehrplan.data.stats import Truncation, length_key, patient_shapes, truncation
from ehrplan.data.vocab import UNK_ID, Vocab
from ehrplan.errors import DataError
from ehrplan.runtime.batch import IGNORE_INDEX, Batch


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(s, s + n)`` for each (s, n), and each element's offset in its range."""
    total = int(lengths.sum())
    group_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    within = np.arange(total) - group_start
    return np.repeat(starts, lengths) + within, within


class EHRDataset(torch.utils.data.Dataset):
    """The patients of one split (or given indices) of a cohort, as ids over a vocabulary."""

    def __init__(
        self,
        cohort: Cohort | ExampleCache,
        vocab: Vocab,
        *,
        split: str | None = "train",
        patients: np.ndarray | None = None,
        max_visits: int,
        max_codes_per_visit: int,
        num_stages: int | None = None,
        ids: np.ndarray | None = None,
        id_cap: int | None = None,
    ) -> None:
        self.cohort = cohort
        self.vocab = vocab
        self.patients = np.asarray(
            patients if patients is not None else cohort.patients_in(split), dtype=np.int64
        )
        self.max_visits = max_visits
        self.max_codes_per_visit = max_codes_per_visit
        self.ids = ids if ids is not None else vocab.encode(cohort.code, cohort.numeric_value)
        self.id_cap = id_cap  # ids at or above it (the rarest tokens) become UNK in a batch
        if num_stages is not None:
            top = int(cohort.stage.max(initial=IGNORE_INDEX))
            if top >= num_stages:
                raise DataError(
                    f"{cohort.root}: stage label {top} needs num_stages > {top} "
                    f"(the config has num_stages={num_stages})"
                )
        self.truncation: Truncation = truncation(
            cohort, self.patients, max_visits, max_codes_per_visit
        )
        nv, widest, _ = patient_shapes(cohort, max_visits, max_codes_per_visit)
        self.lengths = length_key(nv[self.patients], widest[self.patients])

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, i: int) -> int:
        return int(self.patients[i])

    def batch_sampler(
        self, batch_size: int, *, shuffle: bool = True, bucketing: bool = True, seed: int = 0
    ) -> BucketBatchSampler:
        """Batches of dataset positions, bucketed by length when ``bucketing``."""
        return BucketBatchSampler(
            self.lengths, batch_size, shuffle=shuffle, bucketing=bucketing, seed=seed
        )

    def loader(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        bucketing: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> torch.utils.data.DataLoader:
        """A DataLoader of `Batch` objects with per-batch padding."""
        return torch.utils.data.DataLoader(
            self,
            batch_sampler=self.batch_sampler(
                batch_size, shuffle=shuffle, bucketing=bucketing, seed=seed
            ),
            collate_fn=self.collate,
            num_workers=num_workers,
        )

    def collate(self, items: list[int]) -> Batch:
        """Pad the given patients (cohort indices) to their own longest patient and visit."""
        c = self.cohort
        p = np.asarray(items, dtype=np.int64)
        ve = c.visit_offsets[p + 1]
        vs = np.maximum(c.visit_offsets[p], ve - self.max_visits)  # keep the most recent
        nv = ve - vs
        visits, v_local = _ranges(vs, nv)
        b_of_visit = np.repeat(np.arange(len(p)), nv)
        ncodes = np.minimum(c.codes_per_visit()[visits], self.max_codes_per_visit)
        B, V, C = len(p), int(nv.max(initial=1)), int(ncodes.max(initial=1))
        V, C = max(V, 1), max(C, 1)
        events, c_local = _ranges(c.event_offsets[visits], ncodes)
        b_of_event = np.repeat(b_of_visit, ncodes)
        v_of_event = np.repeat(v_local, ncodes)

        codes = np.zeros((B, V, C), dtype=np.int64)
        ids = self.ids[events]
        if self.id_cap is not None:
            ids = np.where(ids >= self.id_cap, UNK_ID, ids)
        codes[b_of_event, v_of_event, c_local] = ids
        time_features = np.zeros((B, V, 2), dtype=np.float32)
        time_features[b_of_visit, v_local] = c.time_features[visits]
        stage = np.full((B, V), IGNORE_INDEX, dtype=np.int64)
        stage[b_of_visit, v_local] = c.stage[visits]
        tte = np.zeros((B, V), dtype=np.float32)
        tte[b_of_visit, v_local] = c.time_to_event[visits]
        observed = np.zeros((B, V), dtype=bool)
        observed[b_of_visit, v_local] = c.event_observed[visits]
        code_t = torch.from_numpy(codes)
        return Batch(
            codes=code_t,
            code_mask=code_t != 0,
            time_features=torch.from_numpy(time_features),
            stage=torch.from_numpy(stage),
            time_to_event=torch.from_numpy(tte),
            event_observed=torch.from_numpy(observed),
        )


class ExampleDataset(torch.utils.data.Dataset):
    """Examples of one split (`ehrplan.data.examples`), served as packed sequences.

    Item ``i`` is sequence ``i``; `collate` pads a list of them to a `Batch` whose labelled
    positions are the examples read from each sequence. The label goes where the kind says:
    ``stage`` holds the class (binary: 0/1; regression: 0, only marking the position),
    ``time_to_event`` the CKD days or the regression target, ``event_observed`` the CKD flag.
    `label_examples` gives the example index of each labelled position of a batch, in the
    row-major order ``batch.stage[mask]`` reads them.
    """

    def __init__(
        self,
        cohort: Cohort | ExampleCache,
        examples: Examples,
        idx: np.ndarray,
        ids: np.ndarray,
        id_cap: int | None = None,
    ) -> None:
        self.cohort = cohort
        self.examples = examples
        self.idx = np.asarray(idx, dtype=np.int64)
        self.ids = ids
        self.id_cap = id_cap  # ids at or above it (the rarest tokens) become UNK in a batch
        self.seq = pack(cohort, examples, self.idx)
        nv, widest = sequence_shapes(cohort, examples, self.seq)
        self.visits_kept, self.widest = nv, widest
        self.lengths = length_key(nv, widest)
        self.loss = truncation_loss(cohort, examples, self.idx)

    @property
    def num_examples(self) -> int:
        return len(self.idx)

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def label_examples(self, items: list[int]) -> np.ndarray:
        """Example indices of the labelled positions of ``collate(items)``, row-major."""
        s = np.asarray(items, dtype=np.int64)
        starts, ends = self.seq.offsets[s], self.seq.offsets[s + 1]
        pos, _ = _ranges(starts, ends - starts)
        return self.seq.members[pos]

    def collate(self, items: list[int]) -> Batch:
        """Pad the given sequences to their own longest window and widest visit."""
        c, ex = self.cohort, self.examples
        s = np.asarray(items, dtype=np.int64)
        sl = slots(c, ex, self.seq, s)
        visits, v_local, b_of_visit, ncodes = sl.visits, sl.slot, sl.row, sl.codes
        B, V, Cb = sl.shape
        events, c_local = _ranges(c.event_offsets[visits], ncodes)
        codes = np.zeros((B, V, Cb), dtype=np.int64)
        ids = self.ids[events]
        if self.id_cap is not None:
            ids = np.where(ids >= self.id_cap, UNK_ID, ids)
        codes[np.repeat(b_of_visit, ncodes), np.repeat(v_local, ncodes), c_local] = ids
        time_features = np.zeros((B, V, 2), dtype=np.float32)
        time_features[b_of_visit, v_local] = c.time_features[visits]
        # labels: each sequence's examples at their positions
        m = self.label_examples(items)
        counts = self.seq.offsets[s + 1] - self.seq.offsets[s]
        starts = self.seq.offsets[s]
        mpos, _ = _ranges(starts, counts)
        b_of_label = np.repeat(np.arange(B), counts)
        pos = self.seq.position[mpos]
        stage = np.full((B, V), IGNORE_INDEX, dtype=np.int64)
        tte = np.zeros((B, V), dtype=np.float32)
        observed = np.zeros((B, V), dtype=bool)
        if ex.kind == "regression":
            stage[b_of_label, pos] = 0
            tte[b_of_label, pos] = ex.value[m]
        else:
            stage[b_of_label, pos] = ex.value[m].astype(np.int64)
        if ex.days is not None and ex.observed is not None:
            tte[b_of_label, pos] = ex.days[m]
            observed[b_of_label, pos] = ex.observed[m]
        code_t = torch.from_numpy(codes)
        return Batch(
            codes=code_t,
            code_mask=code_t != 0,
            time_features=torch.from_numpy(time_features),
            stage=torch.from_numpy(stage),
            time_to_event=torch.from_numpy(tte),
            event_observed=torch.from_numpy(observed),
        )
