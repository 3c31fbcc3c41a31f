"""What the trainer needs from a data set, and the adapter that builds it from `ehrplan.data`.

The trainer sees three splits of indexable patients with a length per patient (for bucketing),
one collate that pads per batch, and the vocabulary. `load_training_data` builds them from a MEDS
data set with `ehrplan.data` (reader, vocabulary on the train split, `EHRDataset`), and
`synthetic_cohort` makes and caches the default synthetic CKD cohort.

The model's embedding table is sized to the data: ``vocab_size = min(config.vocab_size, tokens)``
(the preset's value is a capacity; tokens beyond it, the rarest, map to UNK and are counted).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ehrplan.atomic import ensure_dir, output_error
from ehrplan.errors import DataError, OutputError
from ehrplan.plan.config import EHRModelConfig
from ehrplan.runtime.batch import IGNORE_INDEX, Batch

SPLITS = ("train", "tuning", "held_out")
CACHE_ENV = "EHRPLAN_CACHE"
SYNTH_SEED = 0  # the default cohort's seed; the training seed is separate


@dataclass
class Split:
    """One split: an indexable set of patients and a size per patient (for length bucketing)."""

    dataset: Sequence[Any]
    lengths: np.ndarray


@dataclass
class TrainData:
    """The splits, the collate that turns patients into a `Batch`, and what the run folder keeps."""

    splits: dict[str, Split]
    collate: Callable[[list[Any]], Batch]
    vocab: dict[str, Any]
    majority_stage: int
    source: str
    info: dict[str, Any] = field(default_factory=dict)
    train_times: tuple[np.ndarray, np.ndarray] | None = None
    """Days to progression (or censoring) and whether it was seen, at every labelled train visit:
    the loss's time unit is fitted on them."""

    def split(self, name: str) -> Split:
        return self.splits[name]


def cache_dir() -> Path:
    """Where generated data is cached: ``$EHRPLAN_CACHE`` or ``~/.cache/ehrplan``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "ehrplan"


def synthetic_cohort(patients: int, seed: int = SYNTH_SEED) -> Path:
    """The synthetic CKD cohort of ``patients`` patients, made once (atomically) and cached."""
    import hashlib

    from ehrplan.data import synth, synth_write

    # keyed by the generator's source too: a changed generator never reuses a stale cohort
    source = b"".join(Path(m.__file__).read_bytes() for m in (synth, synth_write))
    code = hashlib.sha256(source).hexdigest()[:10]
    root = cache_dir() / f"synth-ckd-{patients}-seed{seed}-{code}"
    if (root / "metadata" / "dataset.json").is_file():
        return root
    try:
        ensure_dir(root.parent)
    except OutputError as err:
        raise OutputError(
            f"{err} (the cache of synthetic cohorts: set ${CACHE_ENV} to a writable folder)"
        ) from None
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    synth_write.write_cohort(tmp, patients, seed)
    try:
        os.replace(tmp, root)  # another process may have won the race: keep its copy
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "metadata" / "dataset.json").is_file():  # nobody else made it either
            raise output_error(root, err) from None
    return root


def _capped(vocab: Any, size: int) -> Any:
    """The vocabulary limited to its ``size`` most frequent tokens (ids are frequency-ordered)."""
    if len(vocab) <= size:
        return vocab
    return replace(vocab, tokens=vocab.tokens[:size], counts=vocab.counts[:size])


def load_training_data(
    root: Path, config: EHRModelConfig, vocab_file: Path | None = None
) -> tuple[TrainData, EHRModelConfig]:
    """Read ``root`` (MEDS with labels) into splits; return them and the config with its
    ``vocab_size`` fitted to the data. ``vocab_file``: reuse a saved vocabulary (resume)."""
    from ehrplan.data.cache import prepare
    from ehrplan.data.dataset import EHRDataset
    from ehrplan.data.vocab import Vocab

    given = Vocab.load(vocab_file) if vocab_file is not None and vocab_file.is_file() else None
    cohort = prepare(root, vocab=given)  # the example cache: built once, then memory-mapped
    labelled = cohort.stage != IGNORE_INDEX
    if not labelled.any():
        raise DataError(
            f"{root}: no labels (expected a MEDS label task in tasks/ckd_stage/ with "
            "integer_value = stage, float_value = days to the next stage change, "
            "boolean_value = whether it was seen)"
        )
    full = cohort.vocab
    vocab = _capped(full, config.vocab_size)
    config = config.model_copy(update={"vocab_size": len(vocab)})
    ids = cohort.tokens
    id_cap = len(vocab) if len(vocab) < len(full) else None
    splits: dict[str, Split] = {}
    datasets = {}
    for name in SPLITS:
        ds = EHRDataset(
            cohort,
            vocab,
            split=name,
            max_visits=config.max_visits,
            max_codes_per_visit=config.max_codes_per_visit,
            num_stages=config.num_stages,
            ids=ids,
            id_cap=id_cap,
        )
        if len(ds) == 0:
            raise DataError(f"{root}: split '{name}' has no patients (need train/tuning/held_out)")
        datasets[name] = ds
        splits[name] = Split(dataset=ds, lengths=np.asarray(ds.lengths))
    train_visits = np.concatenate(
        [
            np.arange(cohort.visit_offsets[p], cohort.visit_offsets[p + 1])
            for p in datasets["train"].patients
        ]
    )
    stages = cohort.stage[train_visits]
    labelled_train = train_visits[stages != IGNORE_INDEX]
    stages = stages[stages != IGNORE_INDEX]
    if len(stages) == 0:
        raise DataError(f"{root}: the train split has no labelled visits")
    majority = int(np.bincount(stages).argmax())
    trunc = datasets["train"].truncation
    from ehrplan.data.meds import fingerprint

    info = {
        "root": str(root),
        "example_cache": {"path": str(cohort.path), "bytes_on_disk": cohort.disk_bytes()},
        "fingerprint": fingerprint(root),
        "patients": {n: len(d) for n, d in datasets.items()},
        "labelled_visits": int(labelled.sum()),
        "vocab_tokens_in_data": len(full),
        "vocab_size": len(vocab),
        "vocab_tokens_mapped_to_unk": len(full) - len(vocab),
        "truncation_train": {
            k: getattr(trunc, k)
            for k in ("patients_truncated", "visits_dropped", "visits_truncated", "events_dropped")
        },
    }
    data = TrainData(
        splits=splits,
        collate=datasets["train"].collate,
        vocab=vocab.to_json(),
        majority_stage=majority,
        source=str(root),
        info=info,
        train_times=(
            cohort.time_to_event[labelled_train],
            cohort.event_observed[labelled_train],
        ),
    )
    return data, config
