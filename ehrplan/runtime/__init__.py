"""The torch runtime: models, the measured step, batches, training, DDP/FSDP, embeddings.

Every module here may import torch (the `train` extra); the package itself does not, so
`import ehrplan.runtime` stays cheap. Planning lives in `ehrplan.plan`, which never imports this.

- `models`: the LSTM and Transformer families (`build_model`).
- `batch`: the padded `Batch` the models take; `measure`: one real step, measured.
- `training`: the trainer (`ehrplan train`); `compare`: LSTM against Transformer.
- `distributed`: the torchrun runtime (process groups, DDP/FSDP wrapping).
- `embeddings`: pre-trained code embeddings (import, export).
"""
