"""One device-and-precision answer (`ehrplan.plan.target`) across estimate, recommend, validate
and the trainer; the changes recommend suggests, pasted as flags, reproduce their numbers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ehrplan.cli.app import main
from ehrplan.errors import UsageError
from ehrplan.plan import target
from ehrplan.plan.catalog import catalog_names, get_target
from ehrplan.plan.config import get_preset, load_presets
from ehrplan.plan.hardware import Sources, probe
from ehrplan.plan.planner import budget_from_target, plan
from tests.test_hardware import FIXTURES


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--json"])
    out, _ = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), json.loads(out)


MIXED = get_preset("small-lstm").config
FP32 = get_preset("tiny-lstm").config


@pytest.mark.parametrize(
    ("tgt", "want"),
    [
        (target.cuda("A100", "8.0"), "bf16"),
        (target.cuda("T4", "7.5"), "fp16"),  # torch emulates bf16 here; the plan does not
        (target.from_catalog(get_target("t4")), "fp16"),
        (target.from_catalog(get_target("a10")), "bf16"),
        (target.from_catalog(get_target("m1-16gb")), "fp16"),
        (target.DeviceTarget("cpu", "x", "bf16", "CPU with native bf16 (avx512_bf16)"), "bf16"),
        (target.declared("cpu"), "fp32"),
    ],
)
def test_the_rule(tgt: target.DeviceTarget, want: str) -> None:
    got = target.resolve(MIXED, tgt)
    assert got.precision == want and got.device == tgt.device
    assert tgt.evidence in got.reason  # the why travels with the answer
    assert target.resolve(FP32, tgt).precision == "fp32"  # mixed_precision = false
    assert target.resolve(MIXED, tgt, "fp32").precision == "fp32"  # --precision overrides


def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path: Any) -> None:
    report = probe(Sources(root=FIXTURES / "no-gpu" / "root", nvml=object()))
    flags = report.cpu.bf16
    t = target.from_probe(report)
    assert t.device == "cpu" and t.native_half == ("bf16" if flags else None)
    with_bf16 = report.model_copy(update={"cpu": report.cpu.model_copy(update={"bf16": "amx"})})
    assert target.resolve(MIXED, target.from_probe(with_bf16)).precision == "bf16"


@pytest.mark.parametrize(
    ("tgt", "asked"),
    [(target.declared("cpu"), "fp16"), (target.declared("mps"), "bf16"), (None, "fp8")],
)
def test_a_precision_the_device_cannot_run_is_refused(
    tgt: target.DeviceTarget | None, asked: str
) -> None:
    with pytest.raises(UsageError):
        target.resolve(MIXED, tgt or target.declared("cuda"), asked)


@pytest.mark.parametrize(
    "argv",
    [
        ["estimate", "--preset", "tiny", "--device", "cpu", "--precision", "fp16"],
        ["estimate", "--preset", "tiny", "--target", "m1-16gb", "--precision", "bf16"],
        ["estimate", "--preset", "tiny", "--target", "nope"],
        ["recommend", "--target", "a10", "--precision", "fp8"],
        ["validate", "tiny", "--budget", "8g", "--device", "mps", "--precision", "bf16"],
    ],
)
def test_bad_device_or_precision_is_one_line_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    _, err = capsys.readouterr()
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err


def test_estimate_and_recommend_give_one_answer_for_every_target_and_preset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in catalog_names():
        code, rec = run_json(["recommend", "--target", name], capsys)
        assert code == 0
        for row in rec["presets"]:
            code, est = run_json(["estimate", "--preset", row["preset"], "--target", name], capsys)
            assert code == 0
            # recommend decides on the process level: estimate's fit_bytes is that figure
            got = (est["fit_bytes"], est["precision"], est["device"], est["precision_reason"])
            want = (row["estimate_bytes"], row["precision"], row["device"])
            assert got == (*want, row["precision_reason"]), (name, row["preset"])


def _changes() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for name in catalog_names():
        for row in plan(budget_from_target(name))["presets"]:
            if row["fits_after_change"]:
                out.append((name, row["preset"], row["fits_after_change"]))
    return out


def test_the_catalog_produces_changes() -> None:
    kinds = {tuple(sorted(ch["changes"])) for _, _, ch in _changes()}
    assert ("batch_size", "gradient_accumulation_steps") in kinds


def test_pasted_flags_reproduce_every_change(capsys: pytest.CaptureFixture[str]) -> None:
    changes = _changes()
    assert changes
    for name, preset, ch in changes:
        flags = ch["flags"].split()
        assert flags, ch
        code, val = run_json(["validate", preset, "--target", name, *flags], capsys)
        assert code == 0, (name, preset, ch["flags"])
        assert val["results"][0]["estimate_bytes"] == ch["estimate_bytes"]
        code, est = run_json(["estimate", "--preset", preset, "--target", name, *flags], capsys)
        assert (est["fit_bytes"], est["precision"]) == (ch["estimate_bytes"], ch["precision"])


def test_batch_size_keeps_the_effective_batch_where_it_divides(
    capsys: pytest.CaptureFixture[str],
) -> None:
    eff = get_preset("large-lstm").config.effective_batch_size
    code, doc = run_json(["estimate", "--preset", "large-lstm", "--batch-size", "16"], capsys)
    assert code == 0 and doc["effective_batch_size"] == eff
    assert f"keeps the effective batch {eff}" in doc["source"]
    code, doc = run_json(["estimate", "--preset", "large-lstm", "--batch-size", "10"], capsys)
    assert doc["effective_batch_size"] == 10
    assert f"the effective batch changes from {eff} to 10" in doc["source"]


def test_every_preset_is_covered() -> None:
    assert {p for _, p, _ in _changes()} <= set(load_presets())


def test_one_host_budget_for_recommend_validate_and_dry_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ehrplan.plan import hardware
    from ehrplan.plan.planner import host_budget
    from ehrplan.plan.units import fmt_bytes

    report = probe(Sources(root=FIXTURES / "container-8gib-v2" / "root", nvml=object()))
    monkeypatch.setattr(hardware, "probe", lambda *a, **k: report)
    want = host_budget(report, 0.1, "")
    assert want.usable_bytes == report.host.available_bytes  # what the OS can give now
    assert want.total_bytes == report.host.budget_bytes  # what the machine (cgroup) has
    _, rec = run_json(["recommend", "--device", "cpu", "--type", "lstm"], capsys)
    _, val = run_json(["validate", "tiny", "--device", "cpu"], capsys)
    for doc in (rec, val):
        b = doc["budget"]
        assert (b["usable_bytes"], b["total_bytes"], b["budget_bytes"]) == (
            want.usable_bytes,
            want.total_bytes,
            want.budget_bytes,
        )
    with pytest.raises(SystemExit) as exc:  # refused before torch, against the same budget
        main(["dry-run", "--preset", "tiny", "--device", "cpu", "--batch-size", "1000000"])
    assert exc.value.code == 1
    assert f"budget {fmt_bytes(want.budget_bytes)}" in capsys.readouterr().err
