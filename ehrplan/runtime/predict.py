"""`ehrplan predict`: a run's best weights over one split of a MEDS task, as a MEDS prediction file.

The file has one row per label row of the split (in the label files' order), with the MEDS
``LabelSchema`` columns ``subject_id``, ``prediction_time`` and the true value column of the
task's kind, beside the predicted columns of the MEDS prediction format:

- binary: ``boolean_value``, ``predicted_boolean_value`` (probability >= 0.5) and
  ``predicted_boolean_probability``;
- multiclass and the CKD composite: ``integer_value``, ``predicted_integer_value`` (the most
  probable class) and, for the composite, ``float_value``/``predicted_float_value`` (days to the
  next stage: true, predicted median);
- regression: ``float_value``, ``predicted_float_value``.

Examples are built, packed and batched exactly as in training (`ehrplan.data.examples`), with the
run's own vocabulary, so the figures computed from this file equal the run's evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ehrplan.errors import DataError, UsageError

SPLITS = ("train", "tuning", "held_out")


def _read_run(run: Path) -> dict[str, Any]:
    for name in ("config.json", "vocab.json", "checkpoints/best.pt"):
        if not (run / name).is_file():
            raise UsageError(f"{run}: not a finished ehrplan run (no {name})")
    try:
        return json.loads((run / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{run / 'config.json'}: not readable JSON ({err})") from None


def predict_table(
    run: Path,
    data_root: Path,
    *,
    task: str | None = None,
    labels: Path | None = None,
    split: str = "held_out",
    device: str = "auto",
) -> tuple[pa.Table, dict[str, Any]]:
    """The prediction table of ``split`` and the metrics of the run's kind on it."""
    import torch

    from ehrplan.plan.config import validate_config
    from ehrplan.runtime.models import build_model
    from ehrplan.runtime.training.checkpoint import load_checkpoint
    from ehrplan.runtime.training.data import DataRequest, load_training_data
    from ehrplan.runtime.training.device import resolve_device
    from ehrplan.runtime.training.loop import make_loss, predict_split
    from ehrplan.runtime.training.metrics import evaluate_task

    if split not in SPLITS:
        raise UsageError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    saved = _read_run(run)
    asked = dict(saved.get("data", {}).get("request") or {})
    if task is not None or labels is not None:
        asked.update(task=task, labels=labels)
    if asked.get("labels") is not None:
        asked["labels"] = Path(asked["labels"])
    config = validate_config(saved["config"])
    data, fitted = load_training_data(data_root, config, run / "vocab.json", DataRequest(**asked))
    run_kind = (saved.get("data", {}).get("task") or {}).get("kind", "ckd_progression")
    if data.task["kind"] != run_kind:
        raise DataError(
            f"{data.info['task']['files'][0]}: {data.task['kind']} labels, but {run} was "
            f"trained on a {run_kind} task"
        )
    if fitted.num_stages != config.num_stages or fitted.vocab_size != config.vocab_size:
        raise DataError(
            f"{data_root}: the task's classes or the vocabulary differ from {run}'s "
            f"(outputs {fitted.num_stages} vs {config.num_stages})"
        )
    dev = resolve_device(device)
    model = build_model(config)
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    model.load_state_dict(state["model"])
    model.to(dev)
    loss_fn = make_loss(data, 1.0)
    loss_fn.load_state_dict(state["loss_fn"])
    loss_fn.to(dev)
    part = data.split(split)
    with torch.no_grad():
        preds, _ = predict_split(
            model, loss_fn, part, data.collate_for(part), config.batch_size * 4, dev
        )
    metrics = evaluate_task(preds, data.task)
    ex = part.dataset.examples  # type: ignore[attr-defined]
    assert preds.examples is not None
    order = np.argsort(ex.label_row[preds.examples], kind="stable")
    e = preds.examples[order]
    cols: dict[str, pa.Array] = {
        "subject_id": pa.array(ex.subject_id[e], pa.int64()),
        "prediction_time": pa.array(ex.prediction_time[e], pa.int64()).cast(pa.timestamp("us")),
    }
    kind = data.task["kind"]
    if kind == "binary":
        prob = preds.stage_prob[order, 0].astype(np.float64)
        cols["boolean_value"] = pa.array(ex.value[e].astype(bool), pa.bool_())
        cols["predicted_boolean_value"] = pa.array(prob >= 0.5, pa.bool_())
        cols["predicted_boolean_probability"] = pa.array(prob, pa.float64())
    elif kind == "regression":
        cols["float_value"] = pa.array(ex.value[e].astype(np.float32), pa.float32())
        cols["predicted_float_value"] = pa.array(preds.predicted_days[order], pa.float64())
    else:
        cols["integer_value"] = pa.array(ex.value[e].astype(np.int64), pa.int64())
        cols["predicted_integer_value"] = pa.array(
            preds.stage_prob[order].argmax(-1).astype(np.int64), pa.int64()
        )
        if kind == "ckd_progression" and ex.days is not None:
            cols["float_value"] = pa.array(ex.days[e].astype(np.float32), pa.float32())
            cols["predicted_float_value"] = pa.array(preds.predicted_days[order], pa.float64())
    info = {
        "run": str(run),
        "data": str(data_root),
        "task": data.info["task"]["name"],
        "kind": kind,
        "split": split,
        "rows": len(e),
        "label_rows_in_split": int(part.dataset.num_examples),  # type: ignore[attr-defined]
        "device": str(dev),
        "metrics": metrics,
    }
    return pa.table(cols), info
