"""Code-embedding files: every format round-trips, mismatches are refused, freezing freezes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ehrplan.errors import DataError
from ehrplan.runtime.embeddings import (
    CodeEmbeddings,
    apply_embeddings,
    fit_width,
    load_embeddings,
    save_embeddings,
)

EMB = CodeEmbeddings(codes=["N18.3", "E11.22", "LOINC//2160-0"], vectors=torch.randn(3, 4))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".txt"])
def test_round_trip(tmp_path, suffix):
    path = save_embeddings(EMB, tmp_path / f"emb{suffix}")
    back = load_embeddings(path)
    assert back.codes == EMB.codes
    torch.testing.assert_close(back.vectors, EMB.vectors)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_text_without_header(tmp_path):
    f = tmp_path / "glove.txt"
    f.write_text("A 1 2\nB 3 4\n")
    assert load_embeddings(f).codes == ["A", "B"]


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("ragged.txt", "A 1 2\nB 3\n", "line 2: 1 values, expected 2"),
        ("nan.txt", "A 1 x\n", "not a number"),
        ("empty.txt", "", "no embeddings"),
        ("dup.txt", "A 1\nA 2\n", "more than once"),
        ("bad.safetensors", "not a safetensors file", "not a readable"),
        ("bad.pt", "garbage", "not a readable"),
        ("emb.csv", "A,1", "unknown embeddings format"),
    ],
)
def test_malformed_files_are_one_line_errors(tmp_path, name, content, fragment):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=fragment) as err:
        load_embeddings(f)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_embeddings(tmp_path / "none.pt")


def test_apply_counts_matches_and_freezes():
    table = nn.Embedding(5, 4, padding_idx=0)
    vocab = {"[PAD]": 0, "[UNK]": 1, "N18.3": 2, "E11.22": 3, "Z99.9": 4}
    before = table.weight.detach().clone()
    m = apply_embeddings(table, EMB, vocab, freeze=True, special_ids=(0, 1))
    assert (m.matched, m.missing, m.unused) == (2, 1, 1)
    torch.testing.assert_close(table.weight[2], EMB.vectors[0])
    torch.testing.assert_close(table.weight[3], EMB.vectors[1])
    torch.testing.assert_close(table.weight[[0, 1, 4]], before[[0, 1, 4]])
    assert not table.weight.requires_grad


def test_width_mismatch_is_refused_unless_projected():
    table = nn.Embedding(5, 3)
    vocab = {"N18.3": 2}
    with pytest.raises(DataError, match="width 4 but code_embed_dim is 3"):
        apply_embeddings(table, EMB, vocab)
    assert apply_embeddings(table, EMB, vocab, project=True).matched == 1


def test_fit_width_keeps_the_principal_directions():
    x = torch.randn(50, 2) @ torch.tensor([[3.0, 0, 0, 0], [0, 1.0, 0, 0]])
    y = fit_width(x, 2)
    assert y.shape == (50, 2)
    # two directions carry all the variance, so the projection keeps all of it
    assert float(y.var(0).sum()) == pytest.approx(float(x.var(0).sum()), rel=1e-4)
    assert fit_width(x, 6).shape == (50, 6)
