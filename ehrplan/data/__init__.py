"""Data: a synthetic CKD cohort written as MEDS, a MEDS reader, a vocabulary and batching.

- `ehrplan.data.synth`: the seeded generator (`ehrplan synth`).
- `ehrplan.data.meds`: reading, checking and writing MEDS files (pyarrow only).
- `ehrplan.data.cohort`: events -> visits -> labels, as flat numpy arrays.
- `ehrplan.data.vocab`: the code vocabulary, built on the train split only.
- `ehrplan.data.stats`: the numbers behind `ehrplan data stats` and data-shaped batch sizes.
- `ehrplan.data.dataset`: the torch Dataset and per-batch-padding collate (the only torch import).

Nothing here imports torch except `ehrplan.data.dataset`.
"""
