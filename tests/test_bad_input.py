"""The bad-input corpus: every command, every kind of bad input, one line on stderr.

Each case runs `ehrplan.cli.app.run` in this process (no interpreter start-up) and asserts the exit
code, exactly one line on stderr, and no traceback. The few cases that need a process of their
own (a terminal encoding, a closed pipe, a FIFO) are at the end. One tiny synthetic data set and
one two-step run, made once per session, serve every case that needs data or a run folder.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from ehrplan.cli.app import run

BIG = str(2**70)
DIGITS_400 = "9" * 400


@dataclass(frozen=True)
class Case:
    """``argv`` (``{name}`` is a path of the `world` fixture), the exit code, and what the one
    line must contain."""

    argv: tuple[str, ...]
    code: int = 2
    says: str = ""
    env: dict[str, str] = field(default_factory=dict)


def c(*argv: str, code: int = 2, says: str = "", env: dict[str, str] | None = None) -> Case:
    return Case(tuple(argv), code, says, env or {})


TINY = ("--preset", "tiny")
TRAIN = ("train", *TINY, "--data", "{data}", "--threads", "1", "--max-steps", "1")
STATS = ("data", "stats", "{data}")

CASES: dict[str, Case] = {
    # --- the command line itself
    "unknown command": c("nope", says="No such command"),
    "unknown subcommand": c("data", "nope", says="No such command"),
    "unknown option": c("presets", "--nope", says="--help"),
    "extra argument": c("presets", "extra", says="--help"),
    "missing argument": c("validate", "--budget", "16g", says="Missing argument"),
    "missing option value": c("estimate", "--preset", says="requires an argument"),
    "data stats without a folder": c("data", "stats", says="Missing argument"),
    "synth without --out": c("synth", says="--out"),
    "export without --out": c("export-embeddings", "{run}", says="--out"),
    "bool flag with a value": c("presets", "--json=maybe", says="--json"),
    "hardware unknown option": c("hardware", "--nope", says="--help"),
    "schema of no command": c("schema", "nope", says="nope"),
    "schema unknown option": c("schema", "--nope", says="--help"),
    "dry-run unknown preset": c("dry-run", "--preset", "nope", says="valid presets"),
    "dry-run batch 0": c("dry-run", *TINY, "--batch-size", "0", says="--batch-size"),
    "dry-run unknown device": c("dry-run", *TINY, "--device", "tpu", says="tpu"),
    "dry-run unknown precision": c("dry-run", *TINY, "--precision", "fp8", says="fp8"),
    "dry-run missing data": c("dry-run", *TINY, "--data", "{tmp}/none", says="none"),
}

# --- numbers: not a number, not finite, out of range, overflowing
for opt, values in {
    "--batch-size": ["abc", "0", "-1", "1.5", BIG],
    "--gpus": ["0", "-1", "abc", BIG],
    "--tflops": ["nan", "inf", "-inf", "-1", "0", "abc", DIGITS_400],
    "--utilisation": ["nan", "inf", "0", "1.5", "-0.1"],
    "--patients": ["0", "-1", BIG],
}.items():
    for v in values:
        CASES[f"estimate {opt} {v[:12]}"] = c("estimate", *TINY, opt, v, says=opt)
for v in ["nan", "inf", "-inf", "-0.1", "1", "1.5", "abc"]:
    CASES[f"recommend --headroom {v}"] = c("recommend", "--memory", "16g", "--headroom", v)
    CASES[f"validate --headroom {v}"] = c("validate", "tiny", "--budget", "16g", "--headroom", v)
for v in [DIGITS_400, "nan", "inf", "-1", "0", "1e400g", "16 apples", "", "0.0000001"]:
    CASES[f"recommend --memory {v[:12]!r}"] = c("recommend", "--memory", v)
    CASES[f"validate --budget {v[:12]!r}"] = c("validate", "tiny", "--budget", v)
for v in ["0", "-1", BIG, "abc"]:
    CASES[f"recommend --gpus {v[:12]}"] = c("recommend", "--memory", "16g", "--gpus", v)
for opt, values in {
    "--lr": ["-1", "0", "nan", "inf", "-inf", "abc", DIGITS_400],
    "--time-weight": ["inf", "nan", "-1"],
    "--seed": ["-1", BIG, "abc"],
    "--eval-every": ["0", "-3"],
    "--save-every": ["0", "-1"],
    "--epochs": ["0", "-1"],
    "--max-steps": ["0", "-1"],
    "--threads": ["0", "-2", BIG],
    "--patients": ["10", "-1", BIG],
    "--bucket-patients": ["-5", BIG],
    "--nproc": ["0", "-1", BIG],
    "--workers": ["-1", BIG, "abc"],
}.items():
    for v in values:
        CASES[f"train {opt} {v[:12]}"] = c(*TRAIN, opt, v, says=opt)
for opt, values in {
    "--visit-window": ["inf", "nan", "-inf", "0", "-1", DIGITS_400],
    "--min-count": ["-1", BIG],
    "--value-bins": ["-1", BIG],
    "--batch-size": ["-1", "0", BIG],
}.items():
    for v in values:
        CASES[f"data stats {opt} {v[:12]}"] = c(*STATS, opt, v, says=opt)
for opt, values in {
    "--patients": ["0", "-1", BIG],
    "--seed": ["-1", BIG, "abc"],
}.items():
    for v in values:
        CASES[f"synth {opt} {v[:12]}"] = c("synth", "--out", "{tmp}/s", opt, v, says=opt)
for opt, values in {
    "--max-steps": ["0", "-1"],
    "--seed": ["-1", BIG],
    "--eval-every": ["0", "-3"],
    "--threads": ["0"],
    "--patients": ["1"],
}.items():
    for v in values:
        CASES[f"compare {opt} {v[:12]}"] = c("compare", opt, v, says=opt)

# --- config overrides and names
for item in [
    "dropout=nan", "dropout=inf", "hidden_dim=nan", "hidden_dim=1e400", "hidden_dim=-1",
    "hidden_dim=" + DIGITS_400, "bogus=1", "noequals", "=3", "batch_size=abc", "dropout=1",
    "vocab_size=" + BIG, "max_visits=" + BIG,
]:  # fmt: skip
    CASES[f"estimate --set {item[:20]}"] = c("estimate", *TINY, "--set", item)
CASES.update(
    {
        "unknown preset": c("estimate", "--preset", "nope", says="valid presets"),
        "unknown size": c("estimate", "--size", "huge", says="valid sizes"),
        "unknown type": c("estimate", "--size", "tiny", "--type", "rnn", says="valid types"),
        "preset and size": c("estimate", "--preset", "tiny", "--size", "small"),
        "unknown precision": c("estimate", *TINY, "--precision", "fp8", says="precision"),
        "unknown device": c("estimate", *TINY, "--device", "tpu", says="device"),
        "unknown strategy": c("estimate", *TINY, "--strategy", "zero3"),
        "fsdp on one gpu": c("estimate", *TINY, "--strategy", "fsdp"),
        "unknown target": c("estimate", *TINY, "--target", "h9000", says="h9000"),
        "recommend unknown target": c("recommend", "--target", "h9000"),
        "recommend target and memory": c("recommend", "--target", "a10", "--memory", "16g"),
        "recommend device without memory": c("recommend", "--device", "cuda"),
        "recommend unknown device": c("recommend", "--memory", "16g", "--device", "tpu"),
        "recommend unknown type": c("recommend", "--memory", "16g", "--type", "rnn"),
        "recommend unknown strategy": c("recommend", "--memory", "16g", "--strategy", "x"),
        "validate no budget": c("validate", "tiny", says="--budget"),
        "validate budget and target": c("validate", "tiny", "--budget", "1g", "--target", "a10"),
        "validate unknown preset": c("validate", "nope", "--budget", "16g", says="nope"),
    }
)

# --- config files
for name, label in {
    "latin1": "non-UTF-8", "empty": "empty", "only_meta": "empty", "nan": "nan", "inf": "inf",
    "huge": "huge", "malformed": "malformed", "unknown_field": "unknown", "fifo": "fifo",
    "dir": "directory", "missing": "missing", "array": "array",
}.items():  # fmt: skip
    path = "/dev/null" if name == "devnull" else f"{{{name}_toml}}"
    CASES[f"estimate --config {label}"] = c("estimate", "--config", path)
    CASES[f"validate config {label}"] = c("validate", path, "--budget", "16g")
CASES["estimate --config /dev/null"] = c("estimate", "--config", "/dev/null", says="/dev/null")
CASES["estimate --config /dev/zero"] = c("estimate", "--config", "/dev/zero", says="/dev/zero")
CASES["validate /dev/zero"] = c("validate", "/dev/zero", "--budget", "16g", says="/dev/zero")
CASES["train --config fifo"] = c(*TRAIN[:1], "--config", "{fifo_toml}", "--data", "{data}")

# --- data sets and labels
for name, says in {
    "nan_labels": "float_value",
    "inf_labels": "float_value",
    "negative_days": "negative",
    "uint64_ids": "subject_id",
    "uint64_label_ids": "subject_id",
}.items():
    CASES[f"data stats {name}"] = c("data", "stats", f"{{{name}}}", says=says)
    CASES[f"train {name}"] = c(*TRAIN[:4], f"{{{name}}}", *TRAIN[5:], says=says)
PREP = {"EHRPLAN_CACHE": "{tmp}/cache"}  # `data prepare` writes its cache there
for opt, v in [
    ("--visit-window", "nan"), ("--visit-window", "inf"), ("--visit-window", "0"),
    ("--min-count", "-1"), ("--value-bins", "-1"), ("--value-bins", BIG),
]:  # fmt: skip
    CASES[f"data prepare {opt} {v[:12]}"] = c("data", "prepare", "{data}", opt, v, says=opt)
for name, says in {"nan_labels": "float_value", "uint64_ids": "subject_id"}.items():
    CASES[f"data prepare {name}"] = c("data", "prepare", f"{{{name}}}", says=says, env=PREP)
CASES["data prepare missing folder"] = c("data", "prepare", "{tmp}/none", env=PREP)
CASES["data prepare cache under a file"] = c(
    "data", "prepare", "{data}", env={"EHRPLAN_CACHE": "{afile}/cache"}, says="{afile}"
)
CASES.update(
    {
        "data stats missing folder": c("data", "stats", "{tmp}/none", says="no such directory"),
        "data stats a file": c("data", "stats", "{afile}", says="not a directory"),
        "data stats missing labels": c(*STATS, "--labels", "{tmp}/none", says="label"),
        "data stats unknown preset": c(*STATS, "--preset", "nope", says="valid presets"),
        "train missing data": c("train", *TINY, "--data", "{tmp}/none"),
        "train unknown device": c(*TRAIN, "--device", "tpu"),
        "train unknown precision": c(*TRAIN, "--precision", "fp8"),
        "train auto and preset": c("train", "--auto", "--preset", "tiny"),
    }
)

# --- output paths
for where in ["/proc/ehrplan-x", "{afile}/sub", "{afile}"]:
    CASES[f"synth --out {where}"] = c("synth", "-n", "60", "--out", where, says="")
    CASES[f"train --out {where}"] = c(*TRAIN, "--out", where)
    CASES[f"compare --out {where}"] = c("compare", "--data", "{data}", "--out", where)
for where in ["{tmp}", "/proc/x.safetensors", "{afile}/x.pt", "{tmp}/x.bin"]:
    CASES[f"export --out {where}"] = c("export-embeddings", "{run}", "--out", where)
CASES.update(
    {
        "export missing run": c("export-embeddings", "{tmp}/none", "--out", "{tmp}/e.pt"),
        "export unknown checkpoint": c(
            "export-embeddings", "{run}", "--out", "{tmp}/e.pt", "--checkpoint", "middle"
        ),
        "train cache under a file": c(
            "train",
            *TINY,
            "--patients",
            "50",
            "--max-steps",
            "1",
            "--out",
            "{tmp}/ro",
            env={"EHRPLAN_CACHE": "{afile}/cache"},
            says="EHRPLAN_CACHE",
        ),
        "train read-only cache": c(
            "train",
            *TINY,
            "--patients",
            "50",
            "--max-steps",
            "1",
            "--out",
            "{tmp}/ro",
            env={"EHRPLAN_CACHE": "{readonly}/cache"},
            says="{readonly}",
        ),
    }
)

# --- embeddings
CASES.update(
    {
        "train all-NaN embeddings": c(*TRAIN, "--embeddings", "{nan_emb}", says="finite"),
        "train inf embeddings": c(*TRAIN, "--embeddings", "{inf_emb}", says="finite"),
        "train missing embeddings": c(*TRAIN, "--embeddings", "{tmp}/none.pt"),
        "train freeze without embeddings": c(*TRAIN, "--freeze-embeddings"),
    }
)

# --- resuming
CASES.update(
    {
        "resume damaged config.json": c(
            "train", "--resume", "--out", "{damaged_config}", says="config.json"
        ),
        "resume non-UTF-8 config.json": c(
            "train", "--resume", "--out", "{latin1_config}", says="config.json"
        ),
        "resume config.json not an object": c(
            "train", "--resume", "--out", "{list_config}", says="config.json"
        ),
        "resume damaged metrics.jsonl": c(
            "train", "--resume", "--out", "{damaged_metrics}", says="metrics.jsonl"
        ),
        "resume damaged checkpoint": c("train", "--resume", "--out", "{damaged_ckpt}"),
        "resume another data set": c(
            "train", "--resume", "--out", "{run_copy}", "--data", "{other_data}", says="data"
        ),
        "resume an empty folder": c("train", "--resume", "--out", "{tmp}", says="--resume"),
        "resume with another lr": c("train", "--resume", "--out", "{run_copy}", "--lr", "0.5"),
        "new run into a run folder": c(*TRAIN, "--out", "{run}", says="--resume"),
    }
)

assert len(CASES) >= 150, len(CASES)


# ------------------------------------------------------------------------------- the world


def _write_labels(root: Path, mutate: Any) -> None:
    import pyarrow.parquet as pq

    for f in sorted((root / "tasks").rglob("*.parquet")):
        pq.write_table(mutate(pq.read_table(f)), f)


def _float_labels(value: float) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    def mutate(t: Any) -> Any:
        col = t.column("float_value").to_pylist()
        col[0] = value
        i = t.schema.get_field_index("float_value")
        return t.set_column(i, "float_value", pa.array(col, pa.float32()))

    del pc
    return mutate


def _uint64(name: str) -> Any:
    import pyarrow as pa

    def mutate(t: Any) -> Any:
        ids = [2**64 - 1 - k for k in range(t.num_rows)]
        i = t.schema.get_field_index(name)
        return t.set_column(i, name, pa.array(ids, pa.uint64()))

    return mutate


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every file and folder a case names, made once."""
    import pyarrow.parquet as pq

    from ehrplan.data.synth_write import write_cohort

    base = tmp_path_factory.mktemp("bad-input")
    w: dict[str, Path] = {"tmp": base}
    data = base / "data"
    write_cohort(data, 60, seed=0)
    w["data"] = data
    w["other_data"] = base / "other"
    write_cohort(w["other_data"], 60, seed=1)

    # a two-step run to resume and export from
    run_dir = base / "run"
    with _captured():
        code = run([*(a.format(data=data) for a in TRAIN), "--max-steps", "2", "--out",
                    str(run_dir), "--save-every", "1"])  # fmt: skip
    assert code == 0
    w["run"] = run_dir
    for name in ("run_copy", "damaged_config", "latin1_config", "list_config", "damaged_metrics",
                 "damaged_ckpt"):  # fmt: skip
        shutil.copytree(run_dir, base / name)
        w[name] = base / name
    (w["damaged_config"] / "config.json").write_text('{"config": {"hidden')
    (w["latin1_config"] / "config.json").write_bytes(b'{"source": "caf\xe9"}')
    (w["list_config"] / "config.json").write_text("[1, 2]\n")
    (w["damaged_metrics"] / "metrics.jsonl").write_bytes(
        b'{"kind": "step", "step": 1}\n\xff\xfe[3]\n{"kind": "step", "step": 2}\n'
    )
    (w["damaged_ckpt"] / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")

    # config files
    cfg = base / "configs"
    cfg.mkdir()
    files = {
        "latin1": "hidden_dim = 32\n# caf\xe9\n".encode("latin-1"),
        "empty": b"",
        "only_meta": b'[preset]\ndescription = "x"\n',
        "nan": b"dropout = nan\n",
        "inf": b"dropout = inf\n",
        "huge": f"hidden_dim = {2**62}\nvisit_embed_dim = {2**62}\n".encode(),
        "malformed": b"hidden_dim = = 3\n",
        "unknown_field": b"bogus = 3\n",
        "array": b"hidden_dim = [1, 2]\n",
    }
    for name, content in files.items():
        (cfg / f"{name}.toml").write_bytes(content)
        w[f"{name}_toml"] = cfg / f"{name}.toml"
    os.mkfifo(cfg / "fifo.toml")
    w["fifo_toml"] = cfg / "fifo.toml"
    (cfg / "dir.toml").mkdir()
    w["dir_toml"] = cfg / "dir.toml"
    w["missing_toml"] = cfg / "missing.toml"
    w["afile"] = base / "afile"
    w["afile"].write_text("x")

    # bad data sets
    for name, mutate in {
        "nan_labels": _float_labels(float("nan")),
        "inf_labels": _float_labels(float("inf")),
        "negative_days": _float_labels(-5.0),
        "uint64_label_ids": _uint64("subject_id"),
    }.items():
        shutil.copytree(data, base / name)
        _write_labels(base / name, mutate)
        w[name] = base / name
    shutil.copytree(data, base / "uint64_ids")
    for f in sorted((base / "uint64_ids" / "data").rglob("*.parquet")):
        pq.write_table(_uint64("subject_id")(pq.read_table(f)), f)
    w["uint64_ids"] = base / "uint64_ids"

    # embeddings that are not numbers
    for name, value in (("nan_emb", "nan"), ("inf_emb", "inf")):
        tokens = json.loads((run_dir / "vocab.json").read_text())["tokens"][2:6]
        f = base / f"{name}.txt"
        vector = " ".join(["0.5"] * 15 + [value])  # 16 wide, one bad number each
        f.write_text("".join(f"{t} {vector}\n" for t in tokens))
        w[name] = f

    ro = base / "readonly"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    # root writes into a folder without write permission: use a file system nobody can write
    w["readonly"] = Path("/proc/ehrplan-readonly") if os.geteuid() == 0 else ro
    return {k: str(v) for k, v in w.items()}


class _captured:
    """stdout and stderr into strings (the real streams are restored on exit)."""

    def __enter__(self) -> _captured:
        self.out, self.err = io.StringIO(), io.StringIO()
        self._old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.out, self.err
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout, sys.stderr = self._old


def _run(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with _captured() as cap:
        code = run(argv)
    return code, cap.err.getvalue()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_its_exit_code(
    name: str, world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    monkeypatch.chdir(tmp_path)  # default run folders land here
    fill = {**world, "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in case.argv]
    env = {k: v.format(**fill) for k, v in case.env.items()}
    code, err = _run(argv, env, monkeypatch)
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert case.says.format(**fill) in lines[0], err


# ------------------------------------------------------------------------- beyond the corpus


def _proc(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **kw.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "ehrplan", *args], capture_output=True, text=True, env=env,
        timeout=120, **kw,
    )  # fmt: skip


def test_a_terminal_that_is_not_utf8_gets_the_output_not_a_crash() -> None:
    p = _proc(["estimate", "--preset", "tiny"], env={"PYTHONIOENCODING": "ascii"})
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "tiny-lstm" in p.stdout


def test_a_closed_stdout_exits_quietly_with_141() -> None:
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first byte
    try:
        p = subprocess.run(
            [sys.executable, "-m", "ehrplan", "presets"], stdout=w, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
        )  # fmt: skip
    finally:
        os.close(w)
    assert p.returncode == 141 and p.stderr == "", p.stderr


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("YES", True), ("0", False),
                                       ("false", False), ("", False), ("no", False)])  # fmt: skip
def test_ehrplan_debug_shows_the_traceback_only_when_on_and_keeps_the_exit_code(
    value: str, on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, err = _run(["estimate", "--preset", "nope"], {"EHRPLAN_DEBUG": value}, monkeypatch)
    assert code == 2
    assert ("Traceback" in err) == on, err
    assert err.strip().splitlines()[-1].startswith("error: unknown preset")


def test_disk_full_is_named_with_the_path(
    world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ehrplan.atomic

    real = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ehrplan.atomic.os, "fsync", full)
    code, err = _run(["synth", "-n", "60", "--out", str(tmp_path / "s")], {}, monkeypatch)
    monkeypatch.setattr(ehrplan.atomic.os, "fsync", real)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "disk full" in err and str(tmp_path / "s") in err
    assert not list((tmp_path / "s").rglob("*.tmp"))  # no temp file left behind
