#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA device and torch (no data needed): the CUDA tests, then
# `gpu_probe.py` at both paper shapes with the relaxation step replayed as CUDA graphs beside the plain loop
# (same card, same run). Reports go to $OUT (default runs/gpu-checks).
#
#     OUT=runs/gpu-checks bash experiments/gpu_checks.sh
set -euo pipefail
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/machine.txt"
python3 -m pytest -q -p no:cacheprovider tests/fast/test_step_graph.py 2>&1 | tee "$OUT/tests.txt"
python3 experiments/gpu_probe.py --device cuda --cuda-graphs both --repeats 3 --out "$OUT/probe.json" 2>&1 \
    | tee "$OUT/probe.log" | grep -v '^ '
