"""`ehrplan synth` and `ehrplan data stats`: JSON output, exit code 2 on bad data, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli, run_without_torch
from test_meds import BAD_CASES, _bad

from ehrplan.cli.app import main
from ehrplan.plan.config import get_preset


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cli") / "ckd"
    r = run_cli("synth", "--patients", "60", "--out", str(out), "--seed", "2", "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_synth_json(synth_dir: tuple[Path, dict]) -> None:
    out, doc = synth_dir
    assert doc["command"] == "synth" and doc["schema_version"] == 1
    assert doc["patients"] == 60 and doc["seed"] == 2
    rows = sum(pq.read_metadata(p).num_rows for p in (out / "data").rglob("*.parquet"))
    assert doc["events"] == rows
    assert sum(doc["patients_by_split"].values()) == 60


def test_data_stats_json_without_torch(synth_dir: tuple[Path, dict]) -> None:
    out, synth_doc = synth_dir
    args = ["data", "stats", str(out), "--preset", "tiny", "--json"]
    code, out_text, err = run_without_torch(args)
    assert code == 0, err
    doc = json.loads(out_text)
    assert doc["command"] == "data stats"
    assert doc["patients"] == 60 and doc["events"] == synth_doc["events"]
    assert set(doc["visits_per_patient"]) == {"mean", "p50", "p95", "max"}
    assert doc["vocab_size"] == doc["vocab"]["size"] > 2
    lab = doc["labels"]
    assert lab["labelled_visits"] == synth_doc["label_rows"]
    assert sum(lab["stage_counts"].values()) == lab["labelled_visits"]
    assert lab["event_observed"] + lab["censored"] == lab["labelled_visits"]
    [row] = doc["presets"]
    tiny = get_preset("tiny").config
    assert row["preset"] == "tiny-lstm"
    tr = row["truncation"]
    assert (tr["max_visits"], tr["max_codes_per_visit"]) == (
        tiny.max_visits,
        tiny.max_codes_per_visit,
    )
    assert tr["events"] == doc["events"]
    shapes = row["batch_shapes"]["per_batch"]
    assert shapes["visits"]["max"] <= tiny.max_visits
    assert shapes["padding_ratio"] <= shapes["padding_ratio_preset_maxima"]


def test_data_stats_counts_the_train_workers_host_ram(synth_dir: tuple[Path, dict]) -> None:
    out, _ = synth_dir
    docs = []
    for n in ("0", "3"):
        code, text, err = _main(
            ["data", "stats", str(out), "--preset", "tiny", "--train-workers", n, "--json"]
        )
        assert code == 0, err
        docs.append(json.loads(text)["presets"][0]["host_ram_for_data"])
    none, three = docs
    assert none["worker_processes"] == 0 and three["worker_processes"] > 0
    assert three["total"] - none["total"] == (
        three["worker_processes"] + three["batches"] - none["batches"]
    )


def test_data_stats_table_lists_every_preset(synth_dir: tuple[Path, dict]) -> None:
    out, _ = synth_dir
    r = run_cli("data", "stats", str(out))
    assert r.returncode == 0, r.stderr
    assert "small-lstm" in r.stdout and "large-transformer" in r.stdout


def test_synth_into_non_empty_dir_exits_2(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    code, _, err = _main(["synth", "--patients", "3", "--out", str(tmp_path)])
    assert code == 2 and err.count("\n") == 1 and "not an empty directory" in err


def _main(args: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("case", [c for c in BAD_CASES if c != "unknown_label_subjects"])
def test_bad_data_exit_2_one_line(tmp_path: Path, case: str) -> None:
    root, words = _bad(tmp_path, case)
    code, out, err = _main(["data", "stats", str(root)])
    assert code == 2, err
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_labels_for_unknown_subjects_are_counted_not_an_error(tmp_path: Path) -> None:
    root, _ = _bad(tmp_path, "unknown_label_subjects")
    code, out, err = _main(["data", "stats", str(root), "--json"])
    assert code == 0, err
    task = json.loads(out)["task"]
    assert task["labels_unknown_subject"] == 1 and task["examples"] == 1


def test_data_stats_reads_the_example_cache_not_the_whole_data_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data stats` streams the data into the example cache (the one train reads) and takes
    every figure from it: with the whole-data reader made to fail, its figures still equal the
    in-memory cohort's (counts, splits, distinct codes, UNK share, the task's examples, what
    truncation drops and the train sequences' batch shapes)."""
    import numpy as np

    from ehrplan.data import cohort as cohort_mod
    from ehrplan.data import meds
    from ehrplan.data.examples import build_examples, example_shapes, pack, truncation_loss
    from ehrplan.data.stats import shape_dims, summary
    from ehrplan.data.synth_write import write_cohort
    from ehrplan.data.tasks import read_task, resolve_task
    from ehrplan.data.vocab import train_vocab, unk_share

    root = tmp_path / "ckd"
    write_cohort(root, 80, seed=4, shard_size=15)
    cohort = cohort_mod.load_cohort(root, visit_labels=False)  # the reference, read first
    labels = read_task(resolve_task(root, None, None))
    vocab = train_vocab(cohort)

    def whole_data(*_: object, **__: object) -> None:
        raise AssertionError("data stats read the whole data set")

    monkeypatch.setattr(meds, "read_events", whole_data)
    monkeypatch.setattr(cohort_mod, "load_cohort", whole_data)
    code, out, err = _main(["data", "stats", str(root), "--preset", "small-lstm", "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["patients"], doc["visits"], doc["events"]) == (
        cohort.num_patients,
        cohort.num_visits,
        cohort.num_events,
    )
    assert doc["codes_per_visit"] == summary(cohort.codes_per_visit())
    names, counts = np.unique(cohort.split, return_counts=True)
    assert doc["patients_by_split"] == dict(zip(names.tolist(), counts.tolist(), strict=True))
    assert doc["vocab_size"] == len(vocab)
    ref_unk = unk_share(cohort.code, vocab.encode(cohort.code, cohort.numeric_value))
    assert doc["unk"] == ref_unk and doc["distinct_codes"] == ref_unk["distinct_codes"]
    assert Path(doc["example_cache"]).is_dir()
    cfg = get_preset("small-lstm").config
    ex = build_examples(cohort, labels, cfg.max_visits, cfg.max_codes_per_visit)
    assert doc["task"]["examples"] == len(ex)
    [row] = doc["presets"]
    assert row["examples_truncation"] == truncation_loss(cohort, ex).to_dict()
    seq = pack(cohort, ex, ex.in_split(cohort, "train"))
    s = example_shapes(cohort, ex, seq.host)
    mv, mc = cfg.max_visits, cfg.max_codes_per_visit
    want = shape_dims(s["visits_kept"], s["widest"], s["kept"], cfg.batch_size, mv, mc)
    assert row["batch_shapes"]["unit"] == "sequences"
    assert row["batch_shapes"]["per_batch"] == want
