"""What the trainer needs from a data set, and the adapter that builds it from `ehrplan.data`.

The trainer sees three splits of indexable sequences (packed examples, one per label row:
`ehrplan.data.examples`) with a length each (for bucketing), one collate that pads per batch, the
vocabulary and the task. `load_training_data` builds them from a MEDS data set with
`ehrplan.data` (reader, task, examples, vocabulary on the train split, `ExampleDataset`), and
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
from ehrplan.data.tasks import DataRequest
from ehrplan.errors import DataError, OutputError
from ehrplan.plan.config import EHRModelConfig
from ehrplan.runtime.batch import Batch

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
    subject_splits: tuple[np.ndarray, list[str]] | None = None
    """Every subject and its split (saved in the run folder when the split was hashed)."""
    task: dict[str, Any] = field(default_factory=lambda: {"kind": "ckd_progression"})
    """`task_info`: the kind, the model outputs, the train-split baselines."""

    def split(self, name: str) -> Split:
        return self.splits[name]

    def collate_for(self, split: Split) -> Callable[[list[Any]], Batch]:
        """The split's own collate (its items index its own sequences), else the shared one."""
        own = getattr(split.dataset, "collate", None)
        return own if own is not None else self.collate


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


def prepare_data(
    root: Path,
    vocab_file: Path | None = None,
    request: DataRequest | None = None,
    say: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> Any:
    """The example cache (`ehrplan.data.cache`) of ``root`` for this request: opened when it
    exists, built on first use (``say`` gets one line before a build, and progress lines).
    ``vocab_file``: a saved vocabulary (resume), which keys a cache of its own."""
    from ehrplan.data.cache import Settings, prepare
    from ehrplan.data.meds import check_root
    from ehrplan.data.vocab import DEFAULT_MIN_COUNT, Vocab

    req = request or DataRequest()
    check_root(root)
    settings = Settings.for_request(
        root,
        req.task,
        req.labels,
        req.splits,
        min_count=req.min_code_count or DEFAULT_MIN_COUNT,
    )
    vocab = Vocab.load(vocab_file) if vocab_file is not None and vocab_file.is_file() else None
    return prepare(root, settings, vocab, workers=workers, say=say)


def _check_splits(cache: Any, examples: Any) -> None:
    """Every split holds a labelled subject, or one line naming the splits found."""
    splits_file = Path(cache.root) / "metadata" / "subject_splits.parquet"
    for name in SPLITS:
        if not (cache.split == name).any() or not len(examples.in_split(cache, name)):
            where = (
                f"{splits_file} names no subject '{name}' with a label"
                if cache.report.get("splits_file_missing") is None
                else f"the hashed 80/10/10 split left '{name}' without a labelled subject"
            )
            found = sorted({str(x) for x in cache.split.tolist()} - {""})
            raise DataError(
                f"{where} (splits found: {', '.join(found) or 'none'}; map other names with "
                "--splits train=NAME,tuning=NAME,held_out=NAME)"
            )


def load_training_data(
    root: Path,
    config: EHRModelConfig,
    vocab_file: Path | None = None,
    request: DataRequest | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[TrainData, EHRModelConfig]:
    """``root`` (MEDS with a label task) as splits of examples over its memory-mapped example
    cache (`prepare_data`); return them and the config with its ``vocab_size`` fitted to the
    data and ``num_stages`` to the task's kind (binary and regression: one output; multiclass:
    0..largest class). ``vocab_file``: reuse a saved vocabulary (resume). The vocabulary cap
    (the config's ``vocab_size``) keeps the cache's first ``vocab_size`` tokens: larger ids
    become UNK in each batch, as encoding with the capped vocabulary would make them."""
    from ehrplan.data.dataset import ExampleDataset

    cache = prepare_data(root, vocab_file, request, say)
    examples = cache.examples(config.max_visits, config.max_codes_per_visit)
    _check_splits(cache, examples)
    full = cache.vocab
    vocab = _capped(full, config.vocab_size)
    cap = len(vocab) if len(vocab) < len(full) else None
    config = config.model_copy(update={"vocab_size": len(vocab)})
    task = task_info(examples.kind, examples, examples.in_split(cache, "train"), config)
    config = config.model_copy(update={"num_stages": task["outputs"]})
    datasets = {
        n: ExampleDataset(cache, examples, examples.in_split(cache, n), cache.tokens, id_cap=cap)
        for n in SPLITS
    }
    splits = {n: Split(dataset=d, lengths=np.asarray(d.lengths)) for n, d in datasets.items()}
    train_ex = datasets["train"].idx
    t = cache.task
    info = {
        "root": str(root),
        "task": {"name": t["name"], "kind": t["kind"], "files": list(t["files"])},
        "patients": {n: int((cache.split == n).sum()) for n in SPLITS},
        "examples": {n: d.num_examples for n, d in datasets.items()},
        "sequences": {n: len(d) for n, d in datasets.items()},
        "labels": dict(examples.report),
        "splits_hashed": bool(cache.report.get("splits_file_missing")),
        "fingerprint": cache.header["content_fingerprint"],
        "vocab_tokens_in_data": len(full),
        "vocab_size": len(vocab),
        "vocab_tokens_mapped_to_unk": len(full) - len(vocab),
        "unk": cache.unk_share(cap),
        "truncation": {n: d.loss.to_dict() for n, d in datasets.items()},
    }
    data = TrainData(
        splits=splits,
        collate=datasets["train"].collate,
        vocab=vocab.to_json(),
        majority_stage=int(task.get("majority_class", 0)),
        source=str(root),
        info=info,
        train_times=(
            (np.asarray(examples.days[train_ex], np.float32), examples.observed[train_ex])
            if examples.days is not None and examples.observed is not None
            else None
        ),
        task=task,
        subject_splits=(np.asarray(cache.subject_ids), [str(x) for x in cache.split.tolist()]),
    )
    return data, config


def task_info(
    kind: str, examples: Any, train: np.ndarray, config: EHRModelConfig
) -> dict[str, Any]:
    """The task's kind, its model outputs and the train-split baselines its metrics sit beside."""
    y = examples.value[train]
    if len(y) == 0:
        raise DataError("the train split has no labelled examples")
    out: dict[str, Any] = {"kind": kind}
    if kind == "binary":
        out |= {"outputs": 1, "train_prevalence": float(np.mean(y.astype(np.float64)))}
    elif kind == "regression":
        out |= {
            "outputs": 1,
            "train_mean": float(np.mean(y)),
            "train_std": float(np.std(y)) or 1.0,
        }
    else:
        top = int(examples.value.max())
        classes = top + 1 if kind == "multiclass" else config.num_stages
        if top >= classes:
            raise DataError(
                f"stage label {top} needs num_stages > {top} (the config has "
                f"num_stages={config.num_stages})"
            )
        out |= {
            "outputs": max(classes, 2),
            "majority_class": int(np.bincount(y.astype(np.int64)).argmax()),
        }
    return out
