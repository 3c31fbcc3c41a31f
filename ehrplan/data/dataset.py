"""The torch Dataset and collate: `ehrplan.runtime.batch.Batch` padded per batch, not to preset
maxima.

`ExampleDataset` serves a split's examples (`ehrplan.data.examples`: one per label row, cut at
its prediction time) as packed sequences, over a cohort in memory or the memory-mapped example
cache (`ehrplan.data.cache`). A batch is padded to its own longest window and widest visit (not
to ``max_visits`` x ``max_codes_per_visit``); truncation is explicit and counted
(`ExampleDataset.loss`). Collation is vectorised numpy, then ``torch.from_numpy``. (The
patient-level dataset that came before label-row examples is kept in the tests, as the
reference of the patient-level figures `data stats` still reports.)
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
from ehrplan.data.stats import length_key
from ehrplan.data.vocab import UNK_ID
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
