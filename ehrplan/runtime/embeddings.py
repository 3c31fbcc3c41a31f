"""Pre-trained code embeddings: read, write, and load into a model's embedding table.

Formats, chosen by the file's suffix:

- ``.safetensors`` (preferred): one 2-D float tensor ``embeddings`` [n, d]; the code list is a
  JSON array in the file's metadata under ``codes``. Safe to load (no pickle), memory-mappable,
  and readable from any language with a safetensors library.
- ``.pt`` / ``.pth``: ``torch.save({"codes": [...], "embeddings": tensor})``, read back with
  ``torch.load(weights_only=True)``, so a file cannot run code when loaded.
- ``.txt`` / ``.vec``: the word2vec/GloVe text format, one ``code v1 v2 ... vd`` line per code,
  with an optional ``n d`` header line; what most published embedding sets ship as.

Codes of the vocabulary that the file lacks keep their usual random initialisation and are
counted; a width that differs from ``code_embed_dim`` is refused (no silent projection: a
projection is a modelling choice, made explicitly with ``project=True``, which fits the file's
vectors onto the model's width with the top principal directions, or zero-pads narrower ones).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ehrplan.atomic import atomic_path
from ehrplan.errors import DataError

SUFFIXES = (".safetensors", ".pt", ".pth", ".txt", ".vec")


@dataclass(frozen=True)
class CodeEmbeddings:
    """Vectors for a list of codes: ``vectors[i]`` belongs to ``codes[i]``."""

    codes: list[str]
    vectors: torch.Tensor

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.codes):
            raise DataError(
                f"embeddings have shape {tuple(self.vectors.shape)} for {len(self.codes)} codes"
            )
        if len(set(self.codes)) != len(self.codes):
            raise DataError("embeddings list a code more than once")
        finite = torch.isfinite(self.vectors).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise DataError(
                f"{bad} of {len(self.codes)} vectors hold NaN or infinite values (e.g. code "
                f"{self.codes[int((~finite).nonzero()[0])]!r}); embeddings must be finite"
            )

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class EmbeddingMatch:
    """How a file's codes met a vocabulary."""

    matched: int
    """vocabulary codes that took a vector from the file"""
    missing: int
    """vocabulary codes (PAD and UNK excluded) the file lacks: initialised as usual"""
    unused: int
    """file codes that are not in the vocabulary"""


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown embeddings format '{suffix}' (use {', '.join(SUFFIXES)})")
    return suffix


def load_embeddings(path: str | Path) -> CodeEmbeddings:
    """Read a code-embeddings file; every problem is one `DataError` line naming the file."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise DataError(f"embeddings file not found: {path}")
    try:
        if suffix == ".safetensors":
            return _load_safetensors(path)
        if suffix in (".pt", ".pth"):
            return _load_torch(path)
        return _load_text(path)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    except Exception as err:  # a corrupt file raises whatever its parser raises
        raise DataError(
            f"{path}: not a readable {suffix} embeddings file ({_reason(err)})"
        ) from None


def _reason(err: Exception) -> str:
    """One line on why a reader failed (torch's safe unpickler hides it in a long text)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # torch.load(weights_only=True) refused the file
        tail = text.split("WeightsUnpickler error:", 1)[1].splitlines()
        return "the safe unpickler refused it: " + next((t.strip() for t in tail if t.strip()), "")
    return (text.strip().splitlines() or [type(err).__name__])[0]


def _load_safetensors(path: Path) -> CodeEmbeddings:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "embeddings" not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise DataError("no tensor named 'embeddings'")
        vectors = f.get_tensor("embeddings")
    if "codes" not in meta:
        raise DataError("no 'codes' entry in the metadata")
    return CodeEmbeddings(
        codes=[str(c) for c in json.loads(meta["codes"])], vectors=vectors.float()
    )


def _load_torch(path: Path) -> CodeEmbeddings:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "codes" not in obj or "embeddings" not in obj:
        raise DataError("expected a dict with 'codes' and 'embeddings'")
    return CodeEmbeddings(codes=[str(c) for c in obj["codes"]], vectors=obj["embeddings"].float())


def _load_text(path: Path) -> CodeEmbeddings:
    codes: list[str] = []
    rows: list[list[float]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header "n d"
            try:
                values = [float(v) for v in parts[1:]]
            except ValueError:
                raise DataError(f"line {lineno}: a value is not a number") from None
            if rows and len(values) != len(rows[0]):
                raise DataError(f"line {lineno}: {len(values)} values, expected {len(rows[0])}")
            if not values:
                raise DataError(f"line {lineno}: a code with no vector")
            codes.append(parts[0])
            rows.append(values)
    if not rows:
        raise DataError("no embeddings in the file")
    return CodeEmbeddings(codes=codes, vectors=torch.tensor(rows, dtype=torch.float32))


def save_embeddings(emb: CodeEmbeddings, path: str | Path) -> Path:
    """Write ``emb`` in the format the suffix names, atomically (temp file, then rename)."""
    path = Path(path)
    suffix = _suffix(path)
    vectors = emb.vectors.detach().to("cpu", torch.float32).contiguous()
    with atomic_path(path) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"embeddings": vectors}, str(tmp), metadata={"codes": json.dumps(emb.codes)})
        elif suffix in (".pt", ".pth"):
            torch.save({"codes": list(emb.codes), "embeddings": vectors}, tmp)
        else:
            with tmp.open("w", encoding="utf-8") as f:
                f.write(f"{len(emb.codes)} {emb.dim}\n")
                for code, row in zip(emb.codes, vectors.tolist(), strict=True):
                    f.write(code + " " + " ".join(repr(v) for v in row) + "\n")
    return path


def fit_width(vectors: torch.Tensor, width: int) -> torch.Tensor:
    """Project ``[n, d]`` vectors onto ``width`` columns: the top principal directions when
    ``d > width`` (centred PCA, keeping the vectors' scale), zero columns appended when
    ``d < width``."""
    d = vectors.shape[1]
    if d == width:
        return vectors
    if d < width:
        return torch.nn.functional.pad(vectors, (0, width - d))
    centred = vectors - vectors.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:width].T


def apply_embeddings(
    table: nn.Embedding,
    emb: CodeEmbeddings,
    vocab: Mapping[str, int],
    *,
    project: bool = False,
    freeze: bool = False,
    special_ids: tuple[int, ...] = (0,),
) -> EmbeddingMatch:
    """Copy the file's vectors into the rows of ``table`` whose code is in ``vocab``.

    ``vocab`` maps code strings to row ids. Rows in ``special_ids`` (PAD, UNK) are never
    written. ``freeze`` stops gradients for the whole table, so the optimizer keeps no state for
    it (the trainer builds its optimizer over parameters that require gradients).
    """
    width = table.embedding_dim
    vectors = emb.vectors
    if emb.dim != width:
        if not project:
            raise DataError(
                f"embeddings have width {emb.dim} but code_embed_dim is {width}: set "
                f"code_embed_dim={emb.dim}, or project them (--project-embeddings)"
            )
        vectors = fit_width(vectors, width)
    index = {code: i for i, code in enumerate(emb.codes)}
    rows, sources = [], []
    for code, row in vocab.items():
        if row in special_ids:
            continue
        if code in index:
            rows.append(row)
            sources.append(index[code])
    with torch.no_grad():
        if rows:
            table.weight[torch.tensor(rows)] = vectors[torch.tensor(sources)].to(table.weight)
    table.weight.requires_grad_(not freeze)
    vocab_codes = sum(1 for row in vocab.values() if row not in special_ids)
    return EmbeddingMatch(
        matched=len(rows), missing=vocab_codes - len(rows), unused=len(emb.codes) - len(rows)
    )


CHECKPOINTS = ("best", "last")
EMBEDDING_KEY = "encoder.code_embeddings.weight"


def run_embeddings(run_dir: str | Path, checkpoint: str = "best") -> tuple[CodeEmbeddings, int]:
    """A trained run's code embeddings (PAD and UNK left out: they are not codes) and the step of
    the checkpoint they come from. Reads ``checkpoints/<checkpoint>.pt`` with
    ``torch.load(weights_only=True)`` and the run's ``vocab.json``."""
    from ehrplan.data.vocab import PAD_ID, UNK_ID, Vocab

    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise DataError(f"unknown checkpoint '{checkpoint}' (valid: {', '.join(CHECKPOINTS)})")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not run_dir.is_dir():
        raise DataError(f"run folder not found: {run_dir}")
    if not path.is_file():
        other = "last" if checkpoint == "best" else "best"
        raise DataError(f"{run_dir}: no checkpoints/{path.name} (try --checkpoint {other})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weight = state["model"][EMBEDDING_KEY]
    except Exception as err:  # a truncated or foreign file raises whatever its reader raises
        first = _reason(err)
        raise DataError(
            f"{path}: not an ehrplan checkpoint with code embeddings ({first})"
        ) from None
    vocab = Vocab.load(run_dir / "vocab.json")
    if len(vocab) != weight.shape[0]:
        raise DataError(
            f"{run_dir}: vocab.json has {len(vocab)} tokens but the embedding table "
            f"{weight.shape[0]} rows"
        )
    rows = [i for i in range(len(vocab)) if i not in (PAD_ID, UNK_ID)]
    step = state.get("step", state.get("position", {}).get("step"))
    emb = CodeEmbeddings(codes=[vocab.tokens[i] for i in rows], vectors=weight[rows].float())
    return emb, int(step) if step is not None else -1


@dataclass(frozen=True)
class PreparedEmbeddings:
    """A checked embeddings file, ready to be written into a freshly built model."""

    emb: CodeEmbeddings
    vocab: dict[str, int]
    project: bool
    freeze: bool
    info: dict[str, object]
    """what the run folder records: file, format, width, counts, frozen, projected"""

    def apply(self, model: nn.Module) -> EmbeddingMatch:
        """Write the vectors into ``model.encoder.code_embeddings`` (PAD and UNK untouched)."""
        from ehrplan.data.vocab import PAD_ID, UNK_ID

        return apply_embeddings(
            model.encoder.code_embeddings,
            self.emb,
            self.vocab,
            project=self.project,
            freeze=self.freeze,
            special_ids=(PAD_ID, UNK_ID),
        )


def prepare_embeddings(
    path: str | Path,
    tokens: list[str],
    code_embed_dim: int,
    *,
    project: bool = False,
    freeze: bool = False,
) -> PreparedEmbeddings:
    """Read ``path`` and check it against a run's vocabulary (``tokens`` by id) and width, on a
    scratch table, so that a bad or mismatched file is refused before anything is trained or
    written. A file that shares no code with the vocabulary is refused too."""
    from ehrplan.data.vocab import PAD_ID, UNK_ID

    path = Path(path)
    emb = load_embeddings(path)
    vocab = {t: i for i, t in enumerate(tokens)}
    scratch = nn.Embedding(len(tokens), code_embed_dim)
    try:
        match = apply_embeddings(
            scratch, emb, vocab, project=project, freeze=freeze, special_ids=(PAD_ID, UNK_ID)
        )
    except DataError as err:  # name the file
        raise DataError(f"{path}: {err}") from None
    if match.matched == 0:
        raise DataError(
            f"{path}: none of its {len(emb.codes)} codes is in the vocabulary "
            f"({len(tokens) - 2} codes, e.g. {tokens[2] if len(tokens) > 2 else '-'}): "
            "embeddings for another data set?"
        )
    info: dict[str, object] = {
        "file": str(path),
        "format": path.suffix.lower().lstrip("."),
        "codes_in_file": len(emb.codes),
        "dim": emb.dim,
        "code_embed_dim": code_embed_dim,
        "projected": emb.dim != code_embed_dim,
        "frozen": freeze,
        "matched": match.matched,
        "missing": match.missing,
        "unused": match.unused,
    }
    return PreparedEmbeddings(emb=emb, vocab=vocab, project=project, freeze=freeze, info=info)
