"""The batch shapes a config meets on a task's examples, without torch (for plans and dry runs).

`largest_batch` is the one definition of "the data's largest micro-batch": among the first
epoch's length-bucketed micro-batches of the train split (what `ehrplan train` trains, seed 0)
and the batch of its longest sequences, the one with the largest estimate. `ehrplan dry-run
--data` measures that batch; `ehrplan recommend --data` and `validate --data` estimate it, so the
figures agree by construction. `percentiles` names the shape behind it: kept visits per example
and kept codes per visit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ehrplan.data.examples import Examples, Sequences, pack, sequence_shapes, slots
from ehrplan.data.tasks import DataRequest

Groups = list[tuple[int, int]] | None
EstimateFn = Callable[[int, int, int, Groups], int]


@dataclass(frozen=True)
class TaskData:
    """A data set's example cache (`ehrplan.data.cache`) with one task, opened once for every
    preset: the plan reads the same examples, vocabulary and splits as training."""

    cohort: Any
    """The `ExampleCache` (the cohort attributes the shape functions read)."""

    @property
    def task(self) -> dict[str, Any]:
        """The task's name, kind and label files."""
        return dict(self.cohort.task)

    @property
    def label_rows(self) -> int:
        return int(self.cohort.header["report"]["labels"]["label_rows"])

    @property
    def vocab_tokens(self) -> int:
        """Tokens of the train split's vocabulary (PAD and UNK included), as training builds it."""
        return len(self.cohort.vocab)

    def examples(self, max_visits: int, max_codes_per_visit: int) -> Examples:
        return self.cohort.examples(max_visits, max_codes_per_visit)

    def fitted(self, config: Any) -> Any:
        """``config`` as training fits it to this data: the embedding table to the vocabulary,
        the classifier head to the task's kind (`ehrplan.runtime.training.data.task_info`)."""
        kind = self.task["kind"]
        if kind in ("binary", "regression"):
            outputs = 1
        elif kind == "multiclass":
            value = self.examples(1, 1).value
            outputs = max(int(value.max(initial=0)) + 1, 2)
        else:
            outputs = config.num_stages
        return config.model_copy(
            update={
                "vocab_size": min(config.vocab_size, self.vocab_tokens),
                "num_stages": outputs,
            }
        )


def task_settings(root: str | Path, request: DataRequest | None, *, optional_task: bool) -> Any:
    """The cache settings of a command's data options (task, labels, splits, min code count)."""
    from ehrplan.data.cache import Settings
    from ehrplan.data.vocab import DEFAULT_MIN_COUNT

    req = request or DataRequest()
    return Settings.for_request(
        root,
        req.task,
        req.labels,
        req.splits,
        optional_task=optional_task,
        min_count=req.min_code_count or DEFAULT_MIN_COUNT,
    )


def load_task_data(
    root: str | Path,
    request: DataRequest | None = None,
    say: Callable[[str], None] | None = None,
) -> TaskData:
    """The data set's example cache for the request's task, built on first use (``say`` gets
    a line before a build): the same cache `ehrplan train` reads, so nothing is read twice."""
    from ehrplan.data.cache import prepare
    from ehrplan.data.meds import check_root

    check_root(root)
    cache = prepare(root, task_settings(root, request, optional_task=False), say=say)
    return TaskData(cohort=cache)


@dataclass(frozen=True)
class TrainShapes:
    """The train split's examples under one config's maxima, packed as training packs them."""

    examples: Examples
    idx: np.ndarray
    sequences: Sequences
    lengths: np.ndarray


def train_shapes(data: TaskData, max_visits: int, max_codes_per_visit: int) -> TrainShapes:
    from ehrplan.data.stats import length_key

    ex = data.examples(max_visits, max_codes_per_visit)
    idx = ex.in_split(data.cohort, "train")
    seq = pack(data.cohort, ex, idx)
    nv, widest = sequence_shapes(data.cohort, ex, seq)
    return TrainShapes(examples=ex, idx=idx, sequences=seq, lengths=length_key(nv, widest))


def candidate_batches(lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """The first epoch's micro-batches (seed 0, length-bucketed as training does) and the batch
    of the longest sequences."""
    from ehrplan.runtime.training.schedule import bucket_pool, epoch_batches

    out = epoch_batches(lengths, batch_size, 0, 0, bucket_pool(batch_size))
    out.append([int(i) for i in lengths.argsort()[::-1][:batch_size]])
    return out


def batch_groups(codes_per_slot: np.ndarray) -> list[tuple[int, int]]:
    """The within-visit length groups of a batch (`ehrplan.plan.grouping`)."""
    from ehrplan.plan.grouping import group_shapes

    return group_shapes(codes_per_slot.tolist())


def largest_batch(
    cohort: Any,
    shapes: TrainShapes,
    batch_size: int,
    estimate: EstimateFn,
    grouped: bool,
) -> dict[str, Any]:
    """The candidate batch with the largest ``estimate(B, V, C, groups)``: its items (train-split
    sequence indices), shape, groups (None unless ``grouped``) and estimate; the first such batch
    in candidate order. Each distinct shape (and group list) is estimated once; without groups
    the shapes come from the sequences' sizes at once (`_largest_by_shape`), with them from
    each batch's slots."""
    batches = candidate_batches(shapes.lengths, batch_size)
    if not grouped:
        return _largest_by_shape(cohort, shapes, batches, estimate)
    memo: dict[tuple[Any, ...], int] = {}
    best: dict[str, Any] | None = None
    for items in batches:
        sl = slots(cohort, shapes.examples, shapes.sequences, np.asarray(items))
        B, V, C = sl.shape
        groups = batch_groups(sl.codes)
        key = (B, V, C, *groups)
        total = memo.get(key)
        if total is None:
            total = memo[key] = int(estimate(B, V, C, groups))
        if best is None or total > best["estimate_bytes"]:
            best = {"items": items, "shape": [B, V, C], "visit_groups": groups}
            best["estimate_bytes"] = total
    assert best is not None
    return best


def _largest_by_shape(
    cohort: Any, shapes: TrainShapes, batches: list[list[int]], estimate: EstimateFn
) -> dict[str, Any]:
    """`largest_batch` without groups: a batch's (B, V, C) is its size, its sequences' most kept
    visits and widest kept visit (what `slots` pads it to), found for every batch at once."""
    from ehrplan.data.stats import batch_maxima

    nv, widest = sequence_shapes(cohort, shapes.examples, shapes.sequences)
    sizes, (V, C) = batch_maxima(batches, nv, widest)
    keys = np.stack([sizes, np.maximum(V, 1), np.maximum(C, 1)], axis=1)
    uniq, first = np.unique(keys, axis=0, return_index=True)
    totals = np.array([int(estimate(int(b), int(v), int(c), None)) for b, v, c in uniq])
    i = int(first[totals == totals.max()].min())  # the first batch of the largest estimate
    b, v, c = (int(x) for x in keys[i])
    return {
        "items": batches[i],
        "shape": [b, v, c],
        "visit_groups": None,
        "estimate_bytes": int(totals.max()),
    }


def percentiles(data: TaskData, shapes: TrainShapes) -> dict[str, Any]:
    """p50/p95/max of kept visits per train example and of kept codes per kept visit."""
    from ehrplan.data.stats import summary

    ex, idx = shapes.examples, shapes.idx
    codes = slots(data.cohort, ex, shapes.sequences, np.arange(len(shapes.sequences))).codes
    return {
        "examples": len(idx),
        "sequences": len(shapes.sequences),
        "visits_per_example": summary(ex.visits_kept()[idx]),
        "codes_per_visit": summary(codes),
    }


def data_shaped(
    data: TaskData,
    config: Any,
    precision: str,
    device: str,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """One config's estimate at the data's largest micro-batch (as `dry-run --data` picks it),
    the config fitted to the data as training fits it, with the shape percentiles behind it."""
    from ehrplan.plan.estimator import estimate_memory
    from ehrplan.plan.grouping import grouping_enabled

    B = batch_size or config.batch_size
    config = data.fitted(config)
    shapes = train_shapes(data, config.max_visits, config.max_codes_per_visit)

    def estimate(b: int, v: int, c: int, groups: Groups) -> int:
        return estimate_memory(
            config, precision=precision, device=device, checkpointing=config.use_checkpoint,
            batch_size=b, visits=v, codes=c, visit_groups=groups,
        ).total_bytes  # fmt: skip

    grouped = config.model_type == "lstm" and grouping_enabled(device)
    best = largest_batch(data.cohort, shapes, B, estimate, grouped)
    return {
        "shape": best["shape"],
        "vocab_size": config.vocab_size,
        "visit_groups": best["visit_groups"],
        "estimate_bytes": best["estimate_bytes"],
        "precision": precision,
        "percentiles": percentiles(data, shapes),
    }


def annotate_plan(payload: dict[str, Any], data: TaskData, root: str | Path) -> None:
    """Add each preset row's data-shaped estimate (``data_shaped``, with ``fits``) and, per model
    family, the largest preset whose data-shaped step fits as shipped (``data_recommendation``)."""
    from ehrplan.plan.config import get_preset

    device = payload["budget"]["device"]
    for row in payload["presets"]:
        cfg = get_preset(row["preset"]).config
        micro = (row.get("data_parallel") or {}).get("batch_size")
        ds = data_shaped(data, cfg, row["precision"], device, micro)
        ds["fits"] = ds["estimate_bytes"] <= row["budget_bytes"]
        row["data_shaped"] = ds
    payload["data"] = data_summary(data, root)
    rec: dict[str, Any] = {}
    for t in payload["model_types"]:
        fitting = [
            r for r in payload["presets"] if r["preset"] in _of_type(t) and r["data_shaped"]["fits"]
        ]
        rec[t] = (
            {
                "preset": fitting[-1]["preset"],
                "estimate_bytes": fitting[-1]["data_shaped"]["estimate_bytes"],
                "budget_bytes": fitting[-1]["budget_bytes"],
            }
            if fitting
            else None
        )
    payload["data_recommendation"] = rec


def data_summary(data: TaskData, root: str | Path) -> dict[str, Any]:
    """The data block of a plan's output: folder, task, kind and label rows."""
    return {
        "root": str(root),
        "task": data.task["name"],
        "kind": data.task["kind"],
        "label_rows": data.label_rows,
    }


def _of_type(model_type: str) -> set[str]:
    from ehrplan.plan.config import load_presets

    return {n for n, p in load_presets().items() if p.config.model_type == model_type}
