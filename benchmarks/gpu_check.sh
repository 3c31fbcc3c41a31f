#!/usr/bin/env bash
# The device check, prepared for a session that is lent a GPU (an H200 here). No GPU has
# measured anything of ehrplan yet; this measures what only a GPU can show, in one call:
#   1. the hardware probe (NVML) on a real GPU;
#   2. the estimator against measured CUDA steps, every preset at its own batch, fp32 and bf16,
#      checkpointing off and on (`benchmarks/estimator_accuracy.py --device cuda --own-batch`);
#   3. `ehrplan dry-run --device cuda` and `ehrplan train --auto --device cuda --max-steps 50`;
#   4. `ehrplan calibrate --device cuda` (its profile), and the three levels of peak on 12 random
#      configs, estimated before (uncalibrated) and after with that profile:
#      levels_cuda.csv / levels_cuda_calibrated.csv (process level = max_memory_reserved + context).
#
# Here first:   make device-wheels        (wheels the GPU image lacks, into .device-wheels/)
# Then:         run(command="bash benchmarks/gpu_check.sh", carry=[".device-wheels"],
#                   timeout_s=600)
# (about 9 minutes of steps: with the start, within the 15 device minutes a session has;
#  calibration_cuda.json goes to benchmarks/data/ and can be passed with --calibration)
# Everything comes back in $OUT (12 files at most): keep the CSVs in benchmarks/data/ and put the
# figures in the note. Each step has its own time limit, so a slow one cannot eat the others.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
log="$OUT/log.txt"
step() { echo "== $* ($(date +%T))" | tee -a "$log"; }

step "setup"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -V
  python3 -m pip install -q --no-index --no-deps .device-wheels/*.whl
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} >>"$log" 2>&1

step "hardware"
timeout 30 python3 -m ehrplan hardware --json >"$OUT/hardware.json" 2>>"$log"

step "estimator accuracy, CUDA fp32"
timeout 120 python3 benchmarks/estimator_accuracy.py --device cuda --own-batch \
    --csv "$OUT/estimator_accuracy_cuda.csv" >>"$log" 2>&1

step "estimator accuracy, CUDA bf16"
timeout 80 python3 benchmarks/estimator_accuracy.py --device cuda --own-batch --precision bf16 \
    --csv "$OUT/estimator_accuracy_cuda_bf16.csv" >>"$log" 2>&1

step "dry-run"
timeout 40 python3 -m ehrplan dry-run --preset medium-lstm --device cuda --json \
    >"$OUT/dryrun_cuda.json" 2>>"$log"

step "train --auto"
timeout 90 python3 -m ehrplan train --auto --device cuda --max-steps 50 --out /tmp/gpu-run \
    >>"$log" 2>&1
cp /tmp/gpu-run/summary.json "$OUT/train_summary.json" 2>>"$log"
cp /tmp/gpu-run/memory.json "$OUT/train_memory.json" 2>>"$log"
step "calibrate"
timeout 90 python3 -m ehrplan calibrate --device cuda --out "$OUT/calibration_cuda.json" --json \
    >"$OUT/calibrate_cuda.json" 2>>"$log"

step "three levels, random configs, before/after calibration"
timeout 90 python3 benchmarks/estimator_accuracy.py --device cuda --random 12 --seed 7 \
    --csv "$OUT/levels_cuda.csv" >>"$log" 2>&1
timeout 30 python3 benchmarks/estimator_accuracy.py --random-measured "$OUT/levels_cuda.csv" \
    --calibration "$OUT/calibration_cuda.json" --csv "$OUT/levels_cuda_calibrated.csv" >>"$log" 2>&1
step "done"
