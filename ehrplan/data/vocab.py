"""The code vocabulary: built on the train split only, saved and loaded as JSON.

- Ids: PAD = 0 (padding, never a real code), UNK = 1 (a code below the frequency cut-off, or one
  never seen in training), then the kept tokens from 2 on, most frequent first (ties by name), so
  the same data gives the same ids.
- Frequency cut-off: a token is kept when it occurs at least ``min_count`` times in the train
  split. Tuning and held-out data never shape the vocabulary, so they cannot leak into it.
- Numeric values (lab results): by default a code with values is split into quantile bins,
  ``LOINC//2160-0//Q1`` .. ``//Q5``, with the bin edges taken from the train split's values of
  that code (quintiles; ties collapse bins). A model then sees whether a creatinine was high or
  low, not only that it was measured; events without a value keep the bare code. This is the
  usual way value-bearing events are tokenised for code-sequence models (quantile binning of
  lab values into the token). ``value_bins=0`` keeps the code identity only.

No torch: the CLI's ``data stats`` uses this.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ehrplan.atomic import write_json
from ehrplan.errors import DataError

if TYPE_CHECKING:
    from ehrplan.data.cohort import Cohort

PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
FORMAT = "ehrplan-vocab"
VERSION = 1
DEFAULT_MIN_COUNT = 5
DEFAULT_VALUE_BINS = 5
MIN_VALUES_TO_BIN = 20  # a code needs this many train values before it is binned


def _dict_encode(code: pa.Array | pa.ChunkedArray) -> pa.DictionaryArray:
    if isinstance(code, pa.ChunkedArray):
        code = code.combine_chunks()
    return pc.dictionary_encode(code)


def _groups(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A stable sort of ``index`` (values 0..n-1) and each value's start in it (n+1 entries)."""
    order = np.argsort(index, kind="stable")
    starts = np.searchsorted(index[order], np.arange(n + 1))
    return order, starts


def quantile_edges(
    code: pa.Array, values: np.ndarray, bins: int, min_values: int = MIN_VALUES_TO_BIN
) -> dict[str, list[float]]:
    """Per code with at least ``min_values`` numeric values: the inner quantile edges."""
    has = ~np.isnan(values)
    if bins < 2 or not has.any():
        return {}
    enc = _dict_encode(code.filter(pa.array(has)))
    idx = enc.indices.to_numpy()
    names = enc.dictionary.to_pylist()
    v = values[has]
    order, starts = _groups(idx, len(names))
    qs = np.linspace(0, 1, bins + 1)[1:-1]
    edges: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        vals = v[order[starts[i] : starts[i + 1]]]
        if len(vals) < min_values:
            continue
        e = np.unique(np.quantile(vals.astype(np.float64), qs))
        if len(e):
            edges[name] = [float(x) for x in e]
    return edges


def tokenize(code: pa.Array, values: np.ndarray, edges: Mapping[str, list[float]]) -> pa.Array:
    """Codes with a value and bin edges become ``CODE//Qk`` (k = 1..bins); the rest stay bare."""
    if not edges:
        return code
    enc = _dict_encode(code)
    idx = enc.indices.to_numpy()
    names = enc.dictionary.to_pylist()
    order, starts = _groups(idx, len(names))
    k = np.zeros(len(code), dtype=np.int64)
    for i, name in enumerate(names):
        e = edges.get(name)
        if e is None:
            continue
        pos = order[starts[i] : starts[i + 1]]
        v = values[pos]
        ok = ~np.isnan(v)
        k[pos[ok]] = np.searchsorted(np.asarray(e), v[ok], side="right") + 1
    kk = pa.array(k)
    suffixed = pc.binary_join_element_wise(code, pc.cast(kk, pa.string()), "//Q")
    return pc.if_else(pc.greater(kk, 0), suffixed, code)


@dataclass(frozen=True)
class Vocab:
    """Tokens by id (PAD, UNK, then kept tokens), their train counts and the value bin edges."""

    tokens: tuple[str, ...]
    counts: tuple[int, ...]
    min_count: int
    value_bins: int
    bin_edges: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def token_to_id(self) -> dict[str, int]:
        """Token string -> id (PAD and UNK included)."""
        return {t: i for i, t in enumerate(self.tokens)}

    def tokenize(self, code: pa.Array, values: np.ndarray) -> pa.Array:
        return tokenize(code, values, self.bin_edges)

    def encode(self, code: pa.Array, values: np.ndarray) -> np.ndarray:
        """int64 ids of events; UNK for tokens outside the vocabulary."""
        tokens = self.tokenize(code, values)
        pos = pc.index_in(tokens, value_set=pa.array(self.tokens[2:], pa.string()))
        return pc.fill_null(pc.add(pos, 2), UNK_ID).to_numpy().astype(np.int64)

    def encode_dictionary(
        self, code: pa.DictionaryArray, values: np.ndarray, token_id: dict[str, int] | None = None
    ) -> np.ndarray:
        """`encode` for dictionary-encoded codes: each distinct code is looked up once.
        ``token_id``: `token_to_id`, when the caller keeps it across calls."""
        tid = token_id if token_id is not None else self.token_to_id
        names = code.dictionary.to_pylist()
        idx = code.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        base = np.array([max(tid.get(n, UNK_ID), UNK_ID) for n in names] or [UNK_ID])
        ids = base[idx] if len(names) else np.full(len(idx), UNK_ID, np.int64)
        binned = np.array([n in self.bin_edges for n in names], dtype=bool)
        if not binned.any():
            return ids.astype(np.int64)
        pos = np.flatnonzero(binned[idx] & ~np.isnan(values))
        order, starts = _groups(idx[pos], len(names))
        for i in np.flatnonzero(binned):
            sel = pos[order[starts[i] : starts[i + 1]]]
            if not len(sel):
                continue
            e = self.bin_edges[names[i]]
            # CODE//Qk, k = 1..len(e)+1, as `tokenize` names them; ids for k = 0..len(e)+1
            lut = np.array(
                [UNK_ID] + [tid.get(f"{names[i]}//Q{k}", UNK_ID) for k in range(1, len(e) + 2)]
            )
            ids[sel] = lut[np.searchsorted(np.asarray(e), values[sel], side="right") + 1]
        return ids.astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "min_count": self.min_count,
            "value_bins": self.value_bins,
            "tokens": list(self.tokens),
            "counts": list(self.counts),
            "bin_edges": self.bin_edges,
        }

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (atomically)."""
        write_json(Path(path), self.to_json(), sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a vocabulary saved by `save`; a one-line `DataError` if it is not one."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: vocabulary file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not a JSON vocabulary ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise DataError(f"{path}: not an ehrplan vocabulary (no format '{FORMAT}')")
        if doc.get("version") != VERSION:
            raise DataError(f"{path}: vocabulary version {doc.get('version')} != {VERSION}")
        tokens = doc.get("tokens")
        counts = doc.get("counts")
        if (
            not isinstance(tokens, list)
            or tokens[:2] != [PAD_TOKEN, UNK_TOKEN]
            or not isinstance(counts, list)
            or len(counts) != len(tokens)
        ):
            raise DataError(f"{path}: malformed vocabulary (tokens must start with PAD, UNK)")
        return cls(
            tokens=tuple(tokens),
            counts=tuple(int(c) for c in counts),
            min_count=int(doc.get("min_count", 1)),
            value_bins=int(doc.get("value_bins", 0)),
            bin_edges={k: [float(x) for x in v] for k, v in doc.get("bin_edges", {}).items()},
        )


def build_vocab(
    code: pa.Array,
    values: np.ndarray,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    value_bins: int = DEFAULT_VALUE_BINS,
) -> Vocab:
    """A vocabulary over the given (train-split) events: bins, then counts, then the cut-off."""
    if min_count < 1:
        raise DataError(f"min_count must be at least 1 (got {min_count})")
    if len(code) == 0:
        raise DataError("no training events to build a vocabulary from (is the train split empty?)")
    edges = quantile_edges(code, values, value_bins)
    tokens = tokenize(code, values, edges)
    vc = pc.value_counts(tokens)
    names = np.asarray(vc.field("values").to_pylist(), dtype=object)
    counts = vc.field("counts").to_numpy()
    keep = counts >= min_count
    names, counts = names[keep], counts[keep]
    order = np.lexsort((names.astype(str), -counts))  # most frequent first, then by name
    return Vocab(
        tokens=(PAD_TOKEN, UNK_TOKEN, *names[order].tolist()),
        counts=(0, 0, *(int(c) for c in counts[order])),
        min_count=min_count,
        value_bins=value_bins,
        bin_edges=edges,
    )


def train_vocab(
    cohort: Cohort,
    *,
    min_count: int = DEFAULT_MIN_COUNT,
    value_bins: int = DEFAULT_VALUE_BINS,
    split: str = "train",
) -> Vocab:
    """The vocabulary of a cohort's train split (never tuning or held-out events)."""
    patients = cohort.patients_in(split)
    if len(patients) == 0:
        raise DataError(
            f"{cohort.root}: no subjects in split '{split}' to build the vocabulary from "
            f"(splits present: {', '.join(sorted(set(cohort.split.tolist()))) or 'none'})"
        )
    mask = cohort.event_mask(patients)
    return build_vocab(
        cohort.code.filter(pa.array(mask)),
        cohort.numeric_value[mask],
        min_count=min_count,
        value_bins=value_bins,
    )


class VocabCounter:
    """Train events seen shard by shard; `vocab` equals `build_vocab` over all of them at once.

    Keeps a count per bare code and, for codes with values, the values themselves (float32: the
    exact quantile edges need them), so its memory grows with the value-bearing train events,
    4 bytes each, not with the rest.
    """

    def __init__(self) -> None:
        self.bare: dict[str, int] = {}
        self.values: dict[str, list[np.ndarray]] = {}
        self.events = 0
        self.rows = 0
        """Events read in any split (set by the reader: `add` sees the train split's only)."""

    def add(self, code: pa.Array, values: np.ndarray) -> None:
        self.events += len(code)
        has = ~np.isnan(values)
        if pa.types.is_dictionary(code.type):
            self._add_dictionary(code, values, has)
            return
        vc = pc.value_counts(code.filter(pa.array(~has)))
        for name, n in zip(
            vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True
        ):
            self.bare[name] = self.bare.get(name, 0) + n
        if not has.any():
            return
        enc = _dict_encode(code.filter(pa.array(has)))
        names = enc.dictionary.to_pylist()
        order, starts = _groups(enc.indices.to_numpy(), len(names))
        v = values[has]
        for i, name in enumerate(names):
            self.values.setdefault(name, []).append(v[order[starts[i] : starts[i + 1]]])

    def _add_dictionary(
        self, code: pa.DictionaryArray, values: np.ndarray, has: np.ndarray
    ) -> None:
        names = code.dictionary.to_pylist()
        idx = code.indices.to_numpy(zero_copy_only=False)
        bare = np.bincount(idx[~has], minlength=len(names))
        for i in np.flatnonzero(bare):
            self.bare[names[i]] = self.bare.get(names[i], 0) + int(bare[i])
        order, starts = _groups(idx[has], len(names))
        v = values[has]
        for i in np.flatnonzero(np.diff(starts)):
            self.values.setdefault(names[i], []).append(v[order[starts[i] : starts[i + 1]]])

    def vocab(
        self, *, min_count: int = DEFAULT_MIN_COUNT, value_bins: int = DEFAULT_VALUE_BINS
    ) -> Vocab:
        if min_count < 1:
            raise DataError(f"min_count must be at least 1 (got {min_count})")
        if self.events == 0:
            raise DataError(
                "no training events to build a vocabulary from (is the train split empty?)"
            )
        counts = dict(self.bare)
        edges: dict[str, list[float]] = {}
        qs = np.linspace(0, 1, value_bins + 1)[1:-1]
        for name, parts in self.values.items():
            vals = np.concatenate(parts)
            e = np.zeros(0)
            if value_bins >= 2 and len(vals) >= MIN_VALUES_TO_BIN:
                e = np.unique(np.quantile(vals.astype(np.float64), qs))
            if not len(e):
                counts[name] = counts.get(name, 0) + len(vals)
                continue
            edges[name] = [float(x) for x in e]
            k = np.searchsorted(e, vals, side="right") + 1
            for b, n in enumerate(np.bincount(k)):
                if n:
                    token = f"{name}//Q{b}"
                    counts[token] = counts.get(token, 0) + int(n)
        names = np.asarray([n for n, c in counts.items() if c >= min_count], dtype=object)
        kept = np.asarray([counts[n] for n in names], dtype=np.int64)
        order = np.lexsort((names.astype(str), -kept)) if len(names) else np.zeros(0, int)
        return Vocab(
            tokens=(PAD_TOKEN, UNK_TOKEN, *names[order].tolist()),
            counts=(0, 0, *(int(c) for c in kept[order])),
            min_count=min_count,
            value_bins=value_bins,
            bin_edges=edges,
        )


def unk_share(code: pa.Array, ids: np.ndarray) -> dict[str, Any]:
    """Events whose id is UNK, and distinct raw codes none of whose events has an id of its own
    (each with its share)."""
    unk = ids == UNK_ID
    codes = pc.unique(code)
    only_unk = 0
    if unk.any():
        unk_codes = pc.unique(code.filter(pa.array(unk)))
        known = pc.unique(code.filter(pa.array(~unk)))
        only_unk = int(pc.sum(pc.invert(pc.is_in(unk_codes, value_set=known))).as_py() or 0)
    return {
        "events": int(unk.sum()),
        "events_fraction": round(float(unk.mean()), 6) if len(ids) else 0.0,
        "codes": only_unk,
        "codes_fraction": round(only_unk / len(codes), 6) if len(codes) else 0.0,
        "distinct_codes": len(codes),
    }
