#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA device and torch: the CUDA tests, then `gpu_probe.py` at
# both paper shapes with the relaxation step replayed as CUDA graphs beside the plain loop (same card, same run),
# then, where SNLI's data is at hand ($SEQEP_DATA_DIR with snli/ and vectors/), the SNLI `cpu` preset on the GPU
# with and without graphs (3 minutes of training each). Reports go to $OUT (default runs/gpu-checks).
#
#     OUT=runs/gpu-checks bash experiments/gpu_checks.sh
#     SEQEP_DATA_DIR=path/to/data OUT=runs/gpu-checks bash experiments/gpu_checks.sh   # with the training runs
set -euo pipefail
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/machine.txt"
python3 -m pytest -q -p no:cacheprovider tests/fast/test_step_graph.py 2>&1 | tee "$OUT/tests.txt"
python3 experiments/gpu_probe.py --device cuda --cuda-graphs both --repeats 3 --out "$OUT/probe.json" 2>&1 \
    | tee "$OUT/probe.log" | grep -v '^ '
if [ -d "${SEQEP_DATA_DIR:-/nonexistent}/snli" ]; then
    for graphs in 0 1; do
        run=$(mktemp -d)/snli
        SEQEP_CUDA_GRAPHS=$graphs timeout 300 python3 -m analog_ep.cli train --task snli --preset cpu --device cuda \
            --set ep.precision=bf16 --set train.max_minutes=3 --no-progress --out "$run" 2>&1 | tail -3
        cp "$run/report.json" "$OUT/snli-cpu-graphs$graphs.json" || echo "no report from the run with graphs=$graphs"
    done
fi
