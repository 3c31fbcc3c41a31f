"""The patient-level dataset training used before examples became label rows: the tests'
reference for the patient-level shapes and truncation `data stats` reports (`ehrplan.data.stats`)
and for the label-row examples' equality with it.

A batch of B patients is padded to V = its longest patient's kept visits and C = its largest kept
visit. A patient keeps its most recent ``max_visits`` visits, a visit its first
``max_codes_per_visit`` events; every visit of the cohort is a visit here, labelled or not
(stage -100 where not).
"""

from __future__ import annotations

import numpy as np
import torch

from ehrplan.data.cache import ExampleCache
from ehrplan.data.cohort import Cohort
from ehrplan.data.dataset import _ranges
from ehrplan.data.sampler import BucketBatchSampler
from ehrplan.data.stats import Truncation, length_key, patient_shapes, truncation
from ehrplan.data.vocab import UNK_ID, Vocab
from ehrplan.errors import DataError
from ehrplan.runtime.batch import IGNORE_INDEX, Batch


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
