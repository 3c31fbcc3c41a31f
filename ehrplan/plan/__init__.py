"""Planning: everything `estimate`, `recommend`, `validate`, `hardware` and `presets` need.

The rule of this package: it imports no torch, numpy or pyarrow, directly or through any
module it reaches (`tests/test_import_boundary.py` walks the imports and fails otherwise), so
the planner installs without the `train` extra and answers in a fraction of a second.

- `config`: `EHRModelConfig`, the presets and the precedence flag > file > preset > defaults.
- `params`, `flops`: exact parameter counts and FLOPs per step, analytic.
- `estimator`: peak training-step memory on one device, analytic.
- `per_gpu`: the per-GPU estimate under DDP or FSDP, and the time per step.
- `grouping`: the within-visit length groups the estimator and the CPU encoder share.
- `hardware`, `catalog`: what this machine has; the machines one can plan for.
- `planner`: budgets, fit and the recommendation; `units`: sizes and their formatting.
"""
