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

from typing import Any

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


def _fill_pairs(out: np.ndarray, at: np.ndarray, src: np.ndarray, rows: np.ndarray) -> None:
    """``out[at] = src[rows]`` for float32 [N, 2] arrays: seen as N 8-byte items (a view, when
    ``src`` is C-contiguous), one 1-D fancy index moves both columns, several times faster than
    indexing the 2-D rows."""
    if src.dtype == np.float32 and src.flags.c_contiguous and out.flags.c_contiguous:
        out.view(np.int64)[:, 0][at] = src.view(np.int64)[:, 0][rows]
    else:
        out[at] = src[rows]


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

    def __getstate__(self) -> dict[str, Any]:
        """Over a memory-mapped cache's tokens, pickled as the cache (which maps its files
        again), the split's example indices and the window: a DataLoader worker started by
        spawn rebuilds the rest, so the pickle does not grow with the events. Otherwise as is."""
        cache = self.cohort
        if not (isinstance(cache, ExampleCache) and self.ids is cache.tokens):
            return dict(self.__dict__)
        window = (self.examples.max_visits, self.examples.max_codes_per_visit)
        return {"cache": cache, "idx": self.idx, "id_cap": self.id_cap, "window": window}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "window" not in state:
            self.__dict__.update(state)
            return
        cache = state["cache"]
        examples = cache.examples(*state["window"])
        self.__init__(cache, examples, state["idx"], cache.tokens, id_cap=state["id_cap"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, i: int) -> int:
        return int(i)

    def __getitems__(self, items: list[int]) -> list[int]:
        """What a DataLoader hands `collate` for a batch: the positions themselves (one call,
        not one ``__getitem__`` per item)."""
        return items

    def _labelled(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions into ``seq.members`` of the examples of sequences ``s`` (row-major), and
        how many each sequence holds."""
        starts = self.seq.offsets[s]
        counts = self.seq.offsets[s + 1] - starts
        return _ranges(starts, counts)[0], counts

    def label_examples(self, items: list[int]) -> np.ndarray:
        """Example indices of the labelled positions of ``collate(items)``, row-major."""
        return self.seq.members[self._labelled(np.asarray(items, dtype=np.int64))[0]]

    def collate(self, items: list[int]) -> Batch:
        """Pad the given sequences to their own longest window and widest visit.

        Each tensor is filled by one flat fancy-index assignment whose indices are built from
        the batch's own slots (no pass over the cohort): slot ``k`` of row ``b`` at visit
        position ``j`` starts at ``(b * V + j) * C`` of the flattened codes."""
        c, ex = self.cohort, self.examples
        s = np.asarray(items, dtype=np.int64)
        sl = slots(c, ex, self.seq, s)
        B, V, C = sl.shape
        ncodes = sl.codes
        slot_at = sl.row * V + sl.slot  # flat (b, j) of each slot
        # event k of a slot: flat code position = first(slot) + k, event = start(slot) + k
        run = np.arange(int(ncodes.sum()))
        before = np.cumsum(ncodes) - ncodes
        codes = np.zeros(B * V * C, dtype=np.int64)
        ev = c.event_offsets[sl.visits] - before
        ids = self.ids[run + np.repeat(ev, ncodes)]
        if self.id_cap is not None:  # the rarest tokens, beyond the model's vocabulary
            ids = np.where(ids >= self.id_cap, UNK_ID, ids)
        codes[run + np.repeat(slot_at * C - before, ncodes)] = ids
        time_features = np.zeros((B * V, 2), dtype=np.float32)
        _fill_pairs(time_features, slot_at, c.time_features, sl.visits)
        # labels: each sequence's examples at their positions
        mpos, counts = self._labelled(s)
        m = self.seq.members[mpos]
        at = np.repeat(np.arange(0, B * V, V), counts) + self.seq.position[mpos]
        stage = np.full(B * V, IGNORE_INDEX, dtype=np.int64)
        tte = np.zeros(B * V, dtype=np.float32)
        observed = np.zeros(B * V, dtype=bool)
        if ex.kind == "regression":
            stage[at] = 0
            tte[at] = ex.value[m]
        else:
            stage[at] = ex.value[m]
        if ex.days is not None and ex.observed is not None:
            tte[at] = ex.days[m]
            observed[at] = ex.observed[m]
        codes = codes.reshape(B, V, C)
        return Batch(
            codes=torch.from_numpy(codes),
            code_mask=torch.from_numpy(codes != 0),  # numpy's: torch's threads cost more here
            time_features=torch.from_numpy(time_features.reshape(B, V, 2)),
            stage=torch.from_numpy(stage.reshape(B, V)),
            time_to_event=torch.from_numpy(tte.reshape(B, V)),
            event_observed=torch.from_numpy(observed.reshape(B, V)),
        )
