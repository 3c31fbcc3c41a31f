"""`largest_batch`: the data's largest micro-batch, found without estimating every batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ehrplan.data.examples import slots
from ehrplan.data.shapes import (
    batch_groups,
    candidate_batches,
    largest_batch,
    load_task_data,
    train_shapes,
)
from ehrplan.data.synth_write import write_cohort
from ehrplan.plan.config import get_preset
from ehrplan.plan.estimator import estimate_memory


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("shapes") / "ckd"
    write_cohort(root, 150, seed=3, shard_size=40)
    return load_task_data(Path(root))


def _every_batch(cohort: Any, shapes: Any, batch_size: int, estimate: Any, grouped: bool) -> dict:
    """The definition: every candidate batch padded by `slots` and estimated, the first largest."""
    best: dict[str, Any] | None = None
    for items in candidate_batches(shapes.lengths, batch_size):
        sl = slots(cohort, shapes.examples, shapes.sequences, np.asarray(items))
        B, V, C = sl.shape
        groups = batch_groups(sl.codes) if grouped else None
        total = int(estimate(B, V, C, groups))
        if best is None or total > best["estimate_bytes"]:
            best = {"items": items, "shape": [B, V, C], "visit_groups": groups}
            best["estimate_bytes"] = total
    assert best is not None
    return best


@pytest.mark.parametrize("preset", ["small-lstm", "small-transformer", "medium-transformer"])
@pytest.mark.parametrize("grouped", [False, True])
def test_largest_batch_is_the_one_every_batch_estimated_finds(
    data: Any, preset: str, grouped: bool
) -> None:
    cfg = data.fitted(get_preset(preset).config)
    shapes = train_shapes(data, cfg.max_visits, cfg.max_codes_per_visit)

    def estimate(b: int, v: int, c: int, groups: Any) -> int:
        return estimate_memory(
            cfg, device="cpu", batch_size=b, visits=v, codes=c, visit_groups=groups
        ).total_bytes

    for batch_size in (1, 3, cfg.batch_size):
        want = _every_batch(data.cohort, shapes, batch_size, estimate, grouped)
        assert largest_batch(data.cohort, shapes, batch_size, estimate, grouped) == want
