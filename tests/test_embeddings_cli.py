"""Pre-trained code embeddings end to end: one tiny run exports its embeddings, another starts from
them frozen; the frozen table does not move while the rest does, Adam keeps no state for it, and
the estimator's optimizer-state bytes drop by exactly the table's share. Bad files: one line,
exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ehrplan.cli.app import main
from ehrplan.plan.config import get_preset, validate_config
from ehrplan.plan.estimator import estimate_memory, static_memory
from ehrplan.plan.params import count_parameters
from ehrplan.runtime.embeddings import EMBEDDING_KEY, load_embeddings
from ehrplan.runtime.models import build_model
from ehrplan.runtime.training.loss import ProgressionLoss

STEPS = 4
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32, per trainable parameter


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ehrplan.data.synth_write import write_cohort

    root = tmp_path_factory.mktemp("cohort") / "ckd"
    write_cohort(root, 120, seed=2)
    return root


def _train(cohort: Path, out: Path, *extra: str) -> dict[str, Any]:
    args = ["train", "--preset", "tiny", "--data", str(cohort), "--max-steps", str(STEPS)]
    args += ["--threads", "1", "--out", str(out), "--json", *extra]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert int(e.value.code or 0) == 0
    return json.loads((out / "summary.json").read_text())


def _exit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err.strip()


@pytest.fixture(scope="module")
def source(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "source"
    _train(cohort, out, "--seed", "1")
    return out


@pytest.fixture(scope="module")
def exported(source: Path) -> Path:
    f = source.parent / "emb.safetensors"
    with pytest.raises(SystemExit) as e:
        main(["export-embeddings", str(source), "--out", str(f), "--json"])
    assert int(e.value.code or 0) == 0
    return f


@pytest.fixture(scope="module")
def frozen(cohort: Path, exported: Path) -> Path:
    out = exported.parent / "frozen"
    _train(cohort, out, "--seed", "7", "--embeddings", str(exported), "--freeze-embeddings")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".txt"])
def test_export_holds_every_code_of_the_run(
    source: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / f"emb{suffix}"
    code, out, err = _exit(capsys, "export-embeddings", str(source), "--out", str(f), "--json")
    assert code == 0, err
    doc = json.loads(out)
    emb = load_embeddings(f)
    tokens = json.loads((source / "vocab.json").read_text())["tokens"]
    weight = torch.load(source / "checkpoints" / "best.pt", weights_only=True)["model"][
        EMBEDDING_KEY
    ]
    assert emb.codes == tokens[2:]  # PAD and UNK are not codes
    assert torch.equal(emb.vectors, weight[2:])  # exact, in every format
    assert (doc["codes"], doc["dim"]) == (len(tokens) - 2, weight.shape[1])


@pytest.mark.slow
def test_frozen_embeddings_stay_put_while_the_rest_moves(frozen: Path, exported: Path) -> None:
    saved = json.loads((frozen / "config.json").read_text())
    config = validate_config(saved["config"])
    assert config.freeze_embeddings
    emb = load_embeddings(exported)
    record = json.loads((frozen / "embeddings.json").read_text())
    # same cohort, so the same vocabulary: every code found, none missing or unused
    assert (record["matched"], record["missing"], record["unused"]) == (len(emb.codes), 0, 0)
    assert record["frozen"] is True

    state = torch.load(frozen / "checkpoints" / "last.pt", weights_only=True)
    assert state["position"]["step"] == STEPS
    torch.manual_seed(saved["settings"]["seed"])  # the trainer's initial weights
    initial = build_model(config).state_dict()
    weights = state["model"]
    table = weights[EMBEDDING_KEY]
    assert torch.equal(table[2:], emb.vectors)  # the file's vectors, untouched by training
    assert torch.equal(table[:2], initial[EMBEDDING_KEY][:2])  # PAD and UNK: usual init
    moved = [k for k in weights if k != EMBEDDING_KEY and not torch.equal(weights[k], initial[k])]
    assert sorted(moved) == sorted(k for k in weights if k != EMBEDDING_KEY)

    # Adam keeps state for the trainable parameters only (model + the loss's own parameter)
    adam = state["optimizer"]["state"].values()
    loss_params = sum(p.numel() for p in ProgressionLoss().parameters())
    assert sum(s["exp_avg"].numel() for s in adam) == count_parameters(config).trainable + (
        loss_params
    )
    assert count_parameters(config).trainable == count_parameters(config).total - table.numel()


@pytest.mark.slow
def test_the_estimate_of_the_frozen_run_drops_by_the_table(source: Path, frozen: Path) -> None:
    before = json.loads((source / "estimate.json").read_text())["breakdown"]
    after = json.loads((frozen / "estimate.json").read_text())["breakdown"]
    config = validate_config(json.loads((frozen / "config.json").read_text())["config"])
    table = config.vocab_size * config.code_embed_dim
    assert before["optimizer_state"] - after["optimizer_state"] == table * ADAM_STATE_BYTES
    # and it still agrees with the step the trainer measured (no gradient, no Adam state)
    for m in json.loads((frozen / "memory.json").read_text()):
        assert abs(m["error"]) <= 0.10, m


@pytest.mark.slow
def test_a_frozen_run_resumes_frozen(
    frozen: Path, exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _exit(capsys, "train", "--resume", "--out", str(frozen), "--json")
    assert code == 0, err
    assert json.loads(out)["config"]["freeze_embeddings"] is True
    table = torch.load(frozen / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert torch.equal(table[EMBEDDING_KEY][2:], load_embeddings(exported).vectors)


@pytest.mark.parametrize(
    "name", ["tiny-lstm", "tiny-transformer", "small-lstm", "large-transformer"]
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimizer_state_drops_by_exactly_the_table(name: str, precision: str) -> None:
    c = get_preset(name).config
    f = c.model_copy(update={"freeze_embeddings": True})
    table = c.vocab_size * c.code_embed_dim  # nn.Embedding [vocab, code_embed_dim]
    a, b = static_memory(c, precision), static_memory(f, precision)
    assert a["optimizer_state"] - b["optimizer_state"] == table * ADAM_STATE_BYTES
    assert a["gradients"] - b["gradients"] == table * 4  # no fp32 .grad for it
    assert a["parameters"] == b["parameters"]  # the table is still there
    ea, eb = estimate_memory(c, precision=precision), estimate_memory(f, precision=precision)
    assert ea.breakdown["optimizer_state"] - eb.breakdown["optimizer_state"] == table * 8
    assert eb.total_bytes < ea.total_bytes


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def test_bad_embeddings_are_one_line_and_exit_2(
    cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    narrow = _bad(tmp_path, "narrow.txt", "SYNTH//DX//00000 0.1 0.2 0.3\n")
    cases = {
        "width 3 but code_embed_dim is 16": ["--embeddings", str(narrow)],
        "not a number": ["--embeddings", str(_bad(tmp_path, "nan.txt", "A 1 x\n"))],
        "not a readable .safetensors": [
            "--embeddings",
            str(_bad(tmp_path, "bad.safetensors", "garbage")),
        ],
        "embeddings file not found": ["--embeddings", str(tmp_path / "none.pt")],
        "none of its 1 codes is in the vocabulary": [
            "--embeddings",
            str(_bad(tmp_path, "other.txt", "NOT-A-CODE " + " ".join(["0.5"] * 16) + "\n")),
        ],
        "--freeze-embeddings needs --embeddings": ["--freeze-embeddings"],
    }
    for want, extra in cases.items():
        out = tmp_path / "run"
        code, _, err = _exit(
            capsys, "train", "--preset", "tiny", "--data", str(cohort), "--threads", "1",
            "--max-steps", "1", "--out", str(out), *extra,
        )  # fmt: skip
        assert code == 2, (want, err)
        assert want in err and len(err.splitlines()) == 1, err
        assert not out.exists(), want  # refused before the run folder is made
    code, _, err = _exit(capsys, "export-embeddings", str(tmp_path), "--out", "x.pt")
    assert code == 2 and "no checkpoints/best.pt" in err and len(err.splitlines()) == 1, err
