"""A MEDS data set written by another tool trains, predicts, and never leaks the future."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli, run_without_torch
from foreign_meds import write_foreign
from meds import LabelSchema
from sklearn.metrics import roc_auc_score

from ehrplan.cli.app import main
from ehrplan.plan.config import get_preset


def _exit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err.strip()


def _train(capsys, data: Path, out: Path, *extra: str, steps: int = 50) -> dict:
    code, stdout, err = _exit(
        capsys,
        "train", "--preset", "tiny", "--data", str(data), "--max-steps", str(steps),
        "--threads", "1", "--out", str(out), "--json", *extra,
    )  # fmt: skip
    assert code == 0, err
    return json.loads(stdout)


@pytest.mark.slow
def test_foreign_binary_task_trains_and_predicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_foreign(tmp_path / "d", 300, seed=2, split_names=("train", "val", "test"))
    splits = "train=train,tuning=val,held_out=test"
    s = _train(capsys, data, tmp_path / "run", "--task", "mortality", "--splits", splits)
    held = s["best"]["held_out"]
    assert s["task"]["kind"] == "binary" and s["config"]["num_stages"] == 1
    assert held["auroc"] is not None and held["auprc"] is not None
    assert held["baseline_auroc"] == 0.5 and held["baseline_auprc"] == held["prevalence"]
    out = tmp_path / "pred.parquet"
    code, _, err = _exit(
        capsys, "predict", str(tmp_path / "run"), "--data", str(data), "--out", str(out), "--json"
    )
    assert code == 0, err
    table = pq.read_table(out)
    labels = pq.read_table(data / "tasks" / "mortality").to_pydict()
    sp = pq.read_table(data / "metadata" / "subject_splits.parquet").to_pydict()
    test_ids = {i for i, n in zip(sp["subject_id"], sp["split"], strict=True) if n == "test"}
    want = sum(1 for sid in labels["subject_id"] if sid in test_ids)
    assert table.num_rows == want == held["examples"]  # one row per held-out label row
    LabelSchema.validate(table.select(["subject_id", "prediction_time", "boolean_value"]))
    assert table.schema.field("predicted_boolean_probability").type == "double"
    assert table.schema.field("predicted_boolean_value").type == "bool"
    y = np.asarray(table["boolean_value"].to_pylist())
    p = np.asarray(table["predicted_boolean_probability"].to_pylist())
    assert roc_auc_score(y, p) == pytest.approx(held["auroc"], abs=1e-9)
    assert ((p >= 0.5) == np.asarray(table["predicted_boolean_value"].to_pylist())).all()


@pytest.mark.slow
def test_future_codes_do_not_leak_into_the_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The label is noise before the prediction time and a code one hour after it gives it away:
    held-out AUROC stays near chance. The positive control puts the same code *at* the
    prediction time (which MEDS lets a model see) and is learnt."""
    auroc = {}
    for at in (False, True):
        data = write_foreign(
            tmp_path / f"d{at}", 400, seed=5, signal=False, leak=True, leak_at_prediction=at
        )
        s = _train(capsys, data, tmp_path / f"r{at}", "--set", "max_codes_per_visit=64", steps=120)
        auroc[at] = s["best"]["held_out"]["auroc"]
    assert auroc[True] > 0.8, auroc  # the code is learnable when it is allowed
    assert abs(auroc[False] - 0.5) < 0.15, auroc  # and unseen when it comes after


def test_bad_task_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_foreign(tmp_path / "d", 40, seed=1, split_names=None)
    base = ["train", "--preset", "tiny", "--data", str(data), "--max-steps", "1"]
    for args, want in (
        ([*base, "--task", "nope"], "no task 'nope'"),
        ([*base, "--labels", str(tmp_path / "none")], "no such label file"),
        ([*base, "--splits", "train=a,bogus"], "expected train=NAME"),
        (
            ["predict", str(tmp_path / "norun"), "--data", str(data), "--out", "x.parquet"],
            "not a finished ehrplan run",
        ),
    ):
        code, _, err = _exit(capsys, *args)
        assert code == 2 and want in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("runs")) and not (Path("x.parquet")).exists()


@pytest.fixture(scope="module")
def small_foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_foreign(tmp_path_factory.mktemp("own") / "d", 120, seed=4)


def test_data_stats_lists_tasks_and_examples_without_torch(small_foreign: Path) -> None:
    code, out, err = run_without_torch(["data", "stats", str(small_foreign), "--json"])
    assert code == 0, err
    doc = json.loads(out)
    [task] = doc["tasks"]
    labels = pq.read_table(small_foreign / "tasks" / "mortality")
    assert task == {"name": "mortality", "kind": "binary", "label_rows": labels.num_rows}
    t = doc["task"]
    assert sum(t["examples_by_split"].values()) == t["examples"] == labels.num_rows
    assert t["balance"]["positives"] == sum(labels["boolean_value"].to_pylist())
    tiny = next(r for r in doc["presets"] if r["preset"] == "tiny-lstm")
    assert 0 < tiny["examples_truncation"]["events_dropped"] < tiny["examples_truncation"]["events"]
    assert doc["unk"]["events_fraction"] >= 0


def test_recommend_and_validate_answer_from_the_datas_shapes(small_foreign: Path) -> None:
    args = ["recommend", "--memory", "16GiB", "--device", "cpu", "--json"]
    code, out, err = run_without_torch([*args, "--data", str(small_foreign)])
    assert code == 0, err
    doc = json.loads(out)
    for r in doc["presets"]:
        ds = r["data_shaped"]
        v = ds["shape"][1]
        # the data's admissions are few and long: fewer visits than the preset's maxima
        assert v <= 4 < get_preset(r["preset"]).config.max_visits
        assert ds["estimate_bytes"] <= r["estimate_bytes"]
        assert ds["percentiles"]["visits_per_example"]["max"] <= 4
    assert set(doc["data_recommendation"]) == {"lstm", "transformer"}
    small = next(r for r in doc["presets"] if r["preset"] == "small-lstm")
    between = (small["data_shaped"]["estimate_bytes"] + small["estimate_bytes"]) // 2
    base = ["validate", "small-lstm", "--budget", str(between), "--headroom", "0"]
    base += ["--device", "cpu"]
    assert run_without_torch(base)[0] == 1  # preset maxima: does not fit
    code, _, err = run_without_torch([*base, "--data", str(small_foreign)])
    assert code == 0, err  # the data's own batches fit


@pytest.mark.slow
def test_recommend_data_shaped_step_matches_the_dry_run(small_foreign: Path) -> None:
    args = ["recommend", "--memory", "16GiB", "--device", "cpu", "--json"]
    code, out, err = run_without_torch([*args, "--data", str(small_foreign)])
    assert code == 0, err
    small = next(r for r in json.loads(out)["presets"] if r["preset"] == "small-lstm")
    ds = small["data_shaped"]
    r = run_cli(
        "dry-run", "--preset", "small-lstm", "--device", "cpu", "--precision", ds["precision"],
        "--data", str(small_foreign), "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    assert dry["batch_shape"] == ds["shape"]  # the same batch
    assert dry["estimated_peak_bytes"] == ds["estimate_bytes"]  # the same estimate
    assert abs(ds["estimate_bytes"] / dry["measured_peak_bytes"] - 1) < 0.10
