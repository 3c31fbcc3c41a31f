"""`ehrplan synth`: valid MEDS (checked by the `meds` package), deterministic, believable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from meds import (
    CodeMetadataSchema,
    DataSchema,
    DatasetMetadataSchema,
    LabelSchema,
    SubjectSplitSchema,
)

from ehrplan.data.cohort import load_cohort
from ehrplan.data.synth import (
    creatinine_from_egfr,
    egfr_from_creatinine,
    g_category,
    stage_of,
)
from ehrplan.data.synth_write import write_cohort
from ehrplan.errors import UsageError

N = 120


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ckd"
    write_cohort(out, N, seed=3)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_passes_meds_schema_checks(cohort_dir: Path) -> None:
    data = sorted((cohort_dir / "data").rglob("*.parquet"))
    assert {p.parent.name for p in data} == {"train", "tuning", "held_out"}
    codes_seen: set[str] = set()
    for p in data:
        t = pq.read_table(p)
        DataSchema.validate(t)
        assert t.schema.field("numeric_value").type == "float"  # float32
        codes_seen |= set(pc.unique(t.column("code")).to_pylist())
    codes = pq.read_table(cohort_dir / "metadata" / "codes.parquet")
    CodeMetadataSchema.validate(codes)
    # MEDS: codes.parquet lists every code of the data
    assert codes_seen <= set(codes.column("code").to_pylist())
    SubjectSplitSchema.validate(pq.read_table(cohort_dir / "metadata" / "subject_splits.parquet"))
    DatasetMetadataSchema.validate(json.loads((cohort_dir / "metadata/dataset.json").read_text()))
    for p in (cohort_dir / "tasks" / "ckd_stage").rglob("*.parquet"):
        LabelSchema.validate(pq.read_table(p))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, cohort_dir: Path) -> None:
    write_cohort(tmp_path / "again", N, seed=3)
    write_cohort(tmp_path / "other", N, seed=4)
    assert _files(tmp_path / "again") == _files(cohort_dir)
    other = _files(tmp_path / "other")
    assert other.keys() == _files(cohort_dir).keys()
    assert other["data/train/0.parquet"] != _files(cohort_dir)["data/train/0.parquet"]


def test_refuses_a_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an empty directory"):
        write_cohort(tmp_path / "x", 5)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("egfr", "g", "stage"),
    [
        (120, 0, 0),
        (90, 0, 0),
        (89.9, 1, 1),
        (60, 1, 1),
        (59.9, 2, 2),
        (45, 2, 2),
        (44.9, 3, 2),
        (30, 3, 2),
        (29.9, 4, 3),
        (15, 4, 3),
        (14.9, 5, 4),
        (3, 5, 4),
    ],
)
def test_kdigo_categories_and_stages(egfr: float, g: int, stage: int) -> None:
    assert g_category(egfr) == g
    assert stage_of(egfr) == stage


@pytest.mark.parametrize("female", [True, False])
@pytest.mark.parametrize("egfr", [5.0, 14.0, 44.0, 75.0, 110.0])
def test_ckd_epi_2021_inversion(egfr: float, female: bool) -> None:
    scr = creatinine_from_egfr(egfr, 60.0, female)
    assert egfr_from_creatinine(scr, 60.0, female) == pytest.approx(egfr, rel=1e-9)


def test_labels_are_consistent(cohort_dir: Path) -> None:
    lab = pq.read_table(cohort_dir / "tasks" / "ckd_stage" / "0.parquet").to_pydict()
    sid = np.array(lab["subject_id"])
    t = np.array(lab["prediction_time"], dtype="datetime64[us]").astype(np.int64)
    stage = np.array(lab["integer_value"])
    days = np.array(lab["float_value"], dtype=np.float64)
    seen = np.array(lab["boolean_value"])
    assert set(np.unique(stage)) <= set(range(5))
    assert seen.any() and (~seen).any()
    for s in np.unique(sid)[:40]:
        i = np.flatnonzero(sid == s)
        assert (np.diff(stage[i]) >= 0).all()  # true eGFR only falls: stages never go back
        for k, j in enumerate(i):
            later = i[k + 1 :]
            change = later[stage[later] != stage[j]]
            if seen[j]:
                # the first later visit with another stage is exactly `days` away
                assert days[j] * 86_400e6 == pytest.approx(
                    t[change[0]] - t[j], abs=60e6
                )  # float32 days: well under a minute
            else:
                assert len(change) == 0  # censored: no change seen
                assert days[j] * 86_400e6 == pytest.approx(
                    t[i[-1]] - t[j], abs=60e6
                )  # float32 days: well under a minute


def test_stage_is_learnable_but_not_trivially(cohort_dir: Path) -> None:
    """The stage codes and the eGFR lab carry the stage, but noisily and not on every visit."""
    c = load_cohort(cohort_dir)
    codes = np.asarray(c.code.to_pylist(), dtype=object)
    visit_of_event = np.repeat(np.arange(c.num_visits), c.codes_per_visit())
    labelled = c.stage >= 0
    n18 = np.zeros(c.num_visits, dtype=bool)
    is_n18 = np.char.startswith(codes.astype(str), "ICD10CM//N18.")
    n18[visit_of_event[is_n18]] = True
    egfr = np.full(c.num_visits, np.nan)
    is_egfr = np.isin(codes, ["LOINC//98979-8", "LOINC//33914-3"])
    egfr[visit_of_event[is_egfr]] = c.numeric_value[is_egfr]
    has_egfr = labelled & ~np.isnan(egfr)
    agree = np.array([stage_of(v) for v in egfr[has_egfr]]) == c.stage[has_egfr]
    assert 0.3 < n18[labelled].mean() < 0.8  # a stage code on some visits, not all
    assert 0.5 < has_egfr.sum() / labelled.sum() < 0.98  # eGFR measured on most visits
    assert 0.6 < agree.mean() < 0.98  # the measured eGFR mostly, not always, gives the stage


def _events(root: Path) -> pa.Table:
    files = sorted((root / "data").rglob("*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in files).sort_by([("subject_id", "ascending")])


def test_shards_hold_shard_size_patients_and_the_same_events(
    tmp_path: Path, cohort_dir: Path
) -> None:
    write_cohort(tmp_path / "small", N, seed=3, shard_size=25)
    again = tmp_path / "again"
    write_cohort(again, N, seed=3, shard_size=25)
    assert _files(again) == _files(tmp_path / "small")  # same seed and shard size: same bytes
    per_file = {
        str(p.relative_to(tmp_path / "small")): len(pc.unique(pq.read_table(p)["subject_id"]))
        for p in (tmp_path / "small" / "data").rglob("*.parquet")
    }
    assert max(per_file.values()) == 25
    assert len(per_file) > len(list((cohort_dir / "data").rglob("*.parquet")))
    # the shard size changes how subjects are split over files, not what they are
    assert _events(tmp_path / "small").equals(_events(cohort_dir))


def test_first_patients_of_a_larger_cohort_are_the_smaller_cohort(
    tmp_path: Path, cohort_dir: Path
) -> None:
    write_cohort(tmp_path / "few", 30, seed=3)
    few = _events(tmp_path / "few")
    many = _events(cohort_dir)
    assert few.equals(many.filter(pc.less(many["subject_id"], 30)))


def test_refuses_an_output_larger_than_the_free_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    from ehrplan.data import synth_write

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(synth_write.shutil, "disk_usage", lambda _: usage(10**9, 0, 10**6))
    with pytest.raises(UsageError, match="GB free"):
        write_cohort(tmp_path / "big", 10_000)
    assert not (tmp_path / "big").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder either


def test_cli_refuses_a_full_disk_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ehrplan",
            "synth",
            "--patients",
            str(10**13),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "GB free" in r.stderr
    assert not (tmp_path / "x").exists()
