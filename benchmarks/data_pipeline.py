"""Data pipeline benchmark: MEDS reader throughput and the padding that per-batch padding saves.

Run by hand (figures depend on the machine; none is asserted in tests):

    python benchmarks/data_pipeline.py [--patients 2000] [--data DIR] [--preset small-lstm ...]
                                       [--batch-size N] [--repeats 3] [--json]

1. Writes the synthetic CKD cohort (`ehrplan.data.synth`) to a temp directory unless ``--data``
   names a MEDS data set, and times it.
2. Reader throughput: events per second of `load_cohort` (read + check every parquet file, build
   visits, join labels), best of ``--repeats``; then the train-split vocabulary and the encoding
   of every event to ids.
3. Padding ratio = padded positions / real code positions, counted on the real `Batch` tensors
   of one epoch over the train split's examples (`ExampleDataset`: one per label row, packed
   into sequences; B x V x C per batch of sequences against ``code_mask.sum()``), for per-batch
   padding without and with length bucketing, against padding every batch to the preset's
   ``max_visits`` x ``max_codes_per_visit``. Truncation is the preset's in all three, so the real
   positions are the same. Also the collate throughput (examples, i.e. label rows, per second).
4. ``--baseline``: how learnable the stage is from one visit alone: a logistic regression
   (scikit-learn) on each labelled visit's set of token ids, trained on the train split and
   scored on held_out, with and without value bins, against always predicting the majority
   stage. A sequence model should beat it by using the visits before.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # ehrplan.runtime.batch: the stage of a position without a label


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall seconds of each of ``repeats`` calls (the first one cold), and the last result."""
    times, out = [], None
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = _timed(fn, repeats)
    return min(times), out


def padding(ds: Any, batch_size: int, bucketing: bool) -> dict[str, Any]:
    """Padding of one epoch of ``ds`` (an `ExampleDataset`) in batches of ``batch_size``
    sequences, and the collate's throughput in examples (label rows) per second."""
    from ehrplan.data.sampler import batches

    padded = real = examples = sequences = 0
    t = time.perf_counter()
    for items in batches(ds.lengths, batch_size, bucketing=bucketing, seed=0):
        b = ds.collate(items.tolist())
        padded += b.codes.numel()  # B x V x C positions this batch allocates
        real += int(b.code_mask.sum())  # real codes after truncation
        sequences += len(items)
        examples += int((b.stage != IGNORE_INDEX).sum())  # one labelled position per example
    secs = time.perf_counter() - t
    ex = ds.examples
    full = sequences * ex.max_visits * ex.max_codes_per_visit  # every batch at the preset maxima
    return {
        "padded_positions": padded,
        "real_positions": real,
        "padding_ratio": padded / real,
        "preset_maxima_positions": full,
        "padding_ratio_preset_maxima": full / real,
        "collate_examples_per_s": examples / secs,
    }


def baseline(cohort: Any, value_bins: int) -> dict[str, Any]:
    """Logistic regression on one visit's token set -> its stage; train -> held_out."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    from ehrplan.data.vocab import train_vocab

    vocab = train_vocab(cohort, value_bins=value_bins)
    ids = vocab.encode(cohort.code, cohort.numeric_value)
    visit = np.repeat(np.arange(cohort.num_visits), cohort.codes_per_visit())
    x = sp.csr_matrix((np.ones(len(ids)), (visit, ids)), shape=(cohort.num_visits, len(vocab)))
    x.data[:] = 1.0  # presence, not counts
    split = cohort.split[np.repeat(np.arange(cohort.num_patients), cohort.visits_per_patient())]
    labelled = cohort.stage >= 0
    tr, te = labelled & (split == "train"), labelled & (split == "held_out")
    model = LogisticRegression(max_iter=3000).fit(x[tr], cohort.stage[tr])
    majority = np.bincount(cohort.stage[tr]).argmax()
    return {
        "vocab_size": len(vocab),
        "held_out_visits": int(te.sum()),
        "accuracy": float((model.predict(x[te]) == cohort.stage[te]).mean()),
        "majority_accuracy": float((cohort.stage[te] == majority).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, help="an existing MEDS data set (default: synthesize)")
    ap.add_argument("--preset", action="append", help="preset(s); default small-lstm, medium-lstm")
    ap.add_argument("--batch-size", type=int, help="default: each preset's batch_size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", action="store_true", help="single-visit bag-of-codes baseline")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from ehrplan.data.cohort import load_cohort
    from ehrplan.data.dataset import ExampleDataset
    from ehrplan.data.examples import build_examples
    from ehrplan.data.synth_write import write_cohort
    from ehrplan.data.tasks import read_task, resolve_task
    from ehrplan.data.vocab import train_vocab
    from ehrplan.plan.config import get_preset

    result: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = Path(tmp) / "ckd"
            t = time.perf_counter()
            write_cohort(root, args.patients, args.seed)
            result["synth_seconds"] = time.perf_counter() - t
            result["synth_patients"] = args.patients
        times, cohort = _timed(lambda: load_cohort(root), args.repeats)
        secs = min(times)
        result["reader_first_call_events_per_s"] = cohort.num_events / times[0]
        result["data"] = str(args.data or f"synthetic, {args.patients} patients, seed {args.seed}")
        result["events"] = cohort.num_events
        result["visits"] = cohort.num_visits
        result["patients"] = cohort.num_patients
        result["reader_seconds"] = secs
        result["reader_events_per_s"] = cohort.num_events / secs
        vsecs, vocab = _best(lambda: train_vocab(cohort), args.repeats)
        esecs, ids = _best(lambda: vocab.encode(cohort.code, cohort.numeric_value), args.repeats)
        result["vocab_size"] = len(vocab)
        result["vocab_build_seconds"] = vsecs
        result["encode_events_per_s"] = cohort.num_events / esecs
        result["presets"] = {}
        for name in args.preset or ["small-lstm", "medium-lstm"]:
            cfg = get_preset(name).config
            bs = args.batch_size or cfg.batch_size
            labels = read_task(resolve_task(root))
            ex = build_examples(cohort, labels, cfg.max_visits, cfg.max_codes_per_visit)
            ds = ExampleDataset(cohort, ex, ex.in_split(cohort, "train"), ids)
            result["presets"][name] = {
                "batch_size": bs,
                "max_visits": cfg.max_visits,
                "max_codes_per_visit": cfg.max_codes_per_visit,
                "train_examples": ds.num_examples,
                "train_sequences": len(ds),
                "truncation": ds.loss.to_dict(),
                "per_batch": padding(ds, bs, bucketing=False),
                "per_batch_bucketed": padding(ds, bs, bucketing=True),
            }

        if args.baseline:
            result["baseline"] = {f"value_bins={b}": baseline(cohort, value_bins=b) for b in (5, 0)}

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"data: {result['data']}  ({result['python']}, {result['machine']})")
    if "synth_seconds" in result:
        print(f"synth: {result['synth_patients']} patients in {result['synth_seconds']:.2f} s")
    print(
        f"reader: {result['events']:,} events, {result['visits']:,} visits, "
        f"{result['patients']:,} patients in {result['reader_seconds']:.3f} s = "
        f"{result['reader_events_per_s']:,.0f} events/s (best of {args.repeats}; first call "
        f"{result['reader_first_call_events_per_s']:,.0f} events/s)"
    )
    print(
        f"vocabulary (train split): {result['vocab_size']:,} tokens in "
        f"{result['vocab_build_seconds']:.3f} s; encoding {result['encode_events_per_s']:,.0f} "
        "events/s"
    )
    print()
    print(
        f"{'preset':<20}{'B':>4}{'V x C':>10}{'events lost':>13}"
        f"{'per-batch':>11}{'bucketed':>10}{'preset max':>12}{'examples/s':>12}"
    )
    for name, r in result["presets"].items():
        pb, bk = r["per_batch"], r["per_batch_bucketed"]
        print(
            f"{name:<20}{r['batch_size']:>4}"
            f"{str(r['max_visits']) + 'x' + str(r['max_codes_per_visit']):>10}"
            f"{r['truncation']['events_dropped_fraction']:>13.1%}"
            f"{pb['padding_ratio']:>11.2f}{bk['padding_ratio']:>10.2f}"
            f"{pb['padding_ratio_preset_maxima']:>12.2f}{bk['collate_examples_per_s']:>12,.0f}"
        )
    print("\npadding ratio = padded positions / real code positions (1.00 = no padding)")
    for name, r in result.get("baseline", {}).items():
        print(
            f"single-visit baseline ({name}): held-out stage accuracy {r['accuracy']:.3f} "
            f"over {r['held_out_visits']:,} visits; majority stage {r['majority_accuracy']:.3f}"
        )
    return 0


if __name__ == "__main__":
    np.seterr(all="raise")
    sys.exit(main())
