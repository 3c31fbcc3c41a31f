"""The in-memory data path training used before the example cache: the tests' reference.

`ehrplan.runtime.training.data.load_training_data` reads the memory-mapped example cache; its
tests compare what it gives (every batch, the run's recorded info, the losses of a few steps)
with this path, which reads and encodes every event of the data set in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ehrplan.data.tasks import DataRequest
from ehrplan.plan.config import EHRModelConfig
from ehrplan.runtime.training.data import (
    SPLITS,
    Split,
    TrainData,
    _capped,
    _check_splits,
    task_info,
)


def load_in_memory(
    root: Path,
    config: EHRModelConfig,
    vocab_file: Path | None = None,
    request: DataRequest | None = None,
) -> tuple[TrainData, EHRModelConfig]:
    """`load_training_data` as it was before the example cache: the whole data set read into
    memory (load_cohort -> build_examples -> ExampleDataset over the encoded events)."""
    from ehrplan.data.cohort import load_cohort, parse_split_names
    from ehrplan.data.dataset import ExampleDataset
    from ehrplan.data.examples import build_examples
    from ehrplan.data.meds import check_root, fingerprint
    from ehrplan.data.tasks import read_task, resolve_task
    from ehrplan.data.vocab import DEFAULT_MIN_COUNT, Vocab, train_vocab, unk_share

    req = request or DataRequest()
    check_root(root)
    source = resolve_task(root, req.task, req.labels)
    cohort = load_cohort(root, visit_labels=False, split_names=parse_split_names(req.splits))
    labels = read_task(source)
    examples = build_examples(cohort, labels, config.max_visits, config.max_codes_per_visit)
    _check_splits(cohort, examples)
    if vocab_file is not None and vocab_file.is_file():
        full = Vocab.load(vocab_file)
    else:
        full = train_vocab(cohort, min_count=req.min_code_count or DEFAULT_MIN_COUNT)
    vocab = _capped(full, config.vocab_size)
    config = config.model_copy(update={"vocab_size": len(vocab)})
    ids = vocab.encode(cohort.code, cohort.numeric_value)
    task = task_info(labels.kind, examples, examples.in_split(cohort, "train"), config)
    config = config.model_copy(update={"num_stages": task["outputs"]})
    datasets = {
        n: ExampleDataset(cohort, examples, examples.in_split(cohort, n), ids) for n in SPLITS
    }
    splits = {n: Split(dataset=d, lengths=np.asarray(d.lengths)) for n, d in datasets.items()}
    train_ex = datasets["train"].idx
    info = {
        "root": str(root),
        "task": {"name": labels.name, "kind": labels.kind, "files": list(labels.files)},
        "patients": {n: int((cohort.split == n).sum()) for n in SPLITS},
        "examples": {n: d.num_examples for n, d in datasets.items()},
        "sequences": {n: len(d) for n, d in datasets.items()},
        "labels": dict(examples.report),
        "splits_hashed": bool(cohort.report.get("splits_file_missing")),
        "fingerprint": fingerprint(root),
        "vocab_tokens_in_data": len(full),
        "vocab_size": len(vocab),
        "vocab_tokens_mapped_to_unk": len(full) - len(vocab),
        "unk": unk_share(cohort.code, ids),
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
            (examples.days[train_ex].astype(np.float32), examples.observed[train_ex])
            if examples.days is not None and examples.observed is not None
            else None
        ),
        task=task,
        subject_splits=(cohort.subject_ids, [str(x) for x in cohort.split.tolist()]),
    )
    return data, config
