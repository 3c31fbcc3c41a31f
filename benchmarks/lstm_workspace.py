"""The oneDNN LSTM workspace: measured bytes against `ehrplan.plan.estimator.mkldnn_lstm_workspace`.

Calls ``aten::mkldnn_rnn_layer`` (one LSTM layer, fp32, training) directly for a grid of shapes
and records the size of the uint8 workspace it returns and keeps for backward. The formula in
the estimator was fitted on these rows.

    python benchmarks/lstm_workspace.py --csv benchmarks/data/mkldnn_lstm_workspace.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import torch

from ehrplan.plan.estimator import mkldnn_lstm_workspace

HIDDEN = (8, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 144, 160, 192, 256, 320, 384, 448, 512)
SHAPES = [(n, t, h, h) for h in HIDDEN for n, t in ((64, 20), (64, 40), (128, 40))] + [
    (200, 50, 64, 128),  # input narrower than hidden
    (200, 50, 256, 128),  # input wider than hidden
    (4, 50, 258, 256),  # the sequence LSTM of small-lstm: visit vector + 2 time features
    (7, 13, 16, 16),
    (333, 17, 40, 40),
    (1, 1, 8, 8),
]


def workspace_bytes(n: int, steps: int, n_in: int, hidden: int) -> int:
    """Bytes of the workspace ``mkldnn_rnn_layer`` returns for a training forward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, n, n_in, generator=g)
    w_ih = torch.randn(4 * hidden, n_in, generator=g)
    w_hh = torch.randn(4 * hidden, hidden, generator=g)
    b = torch.zeros(4 * hidden)
    h0 = torch.zeros(n, hidden)
    # (input, w_ih, w_hh, b_ih, b_hh, hx, cx, reverse, batch_sizes, mode=LSTM(2), hidden,
    #  num_layers, has_biases, bidirectional, batch_first, train)
    out = torch.ops.aten.mkldnn_rnn_layer(
        x, w_ih, w_hh, b, b, h0, h0, False, [], 2, hidden, 1, True, False, False, True
    )
    return int(out[3].untyped_storage().nbytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", type=Path, help="write the rows to this CSV file")
    args = ap.parse_args()
    rows = []
    print(f"{'n':>5}{'steps':>6}{'in':>5}{'hidden':>7}{'measured':>14}{'formula':>14}{'error':>9}")
    for n, t, i, h in SHAPES:
        measured = workspace_bytes(n, t, i, h)
        formula = mkldnn_lstm_workspace(n, t, i, h)
        err = (formula - measured) / measured
        rows.append(dict(n=n, steps=t, n_in=i, hidden=h, measured_bytes=measured))
        print(f"{n:>5}{t:>6}{i:>5}{h:>7}{measured:>14,}{formula:>14,}{err:>+9.2%}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.csv.parent, suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            f.write(f"# command: python {' '.join(sys.argv)}\n")
            f.write(f"# torch {torch.__version__}, mkldnn {torch.backends.mkldnn.is_available()}\n")
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, args.csv)


if __name__ == "__main__":
    main()
