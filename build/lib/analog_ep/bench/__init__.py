"""`seqep bench`: how fast is one EP training batch, against the paper's way of running it and the hardware.

For each named shape and batch size this measures, each in a fresh subprocess (so that the peak resident
memory belongs to one mode alone):

- **fast path**: one full symmetric-EP training batch (free phase, ±β nudged phases as one doubled batch,
  ∂Φ/∂θ contrast, Adam step) through `analog_ep.estimators.ep_symmetric`, with the chosen precision
  (`fp32`: the exact path; `bf16`: large products on bf16 operands, `phi.LowPrecision`) and early exit;
- **reference-equivalent mode**: the published algorithm as the paper's code runs it
  (`analog_ep.reference.reference_ep_symmetric`: autograd on Φ at every step, synchronous updates,
  float32, +β then −β one after the other), same network, same batch, same Adam step;
- **inference**: free phase only (prediction), samples per second.

FLOPs are counted analytically (`count_flops`, matmul FLOPs of the algorithm, 2 per multiply-add) and set
against this machine's fp32 and bf16 matmul peaks, measured in the same run on large square products.

Inputs (`--inputs`): "real" takes a seeded batch of the task's training split, embedded as training embeds
it (the preset's vectors, length and normalisation; needs the data, `SEQEP_DATA_DIR`); "random" is Gaussian
(RMS 0.6 per entry). Speed depends on the data in two ways: early exit, and the fast path's retrieval
over distinct keys (`fast_retrieval`), which skips repeated words and padding. Random vectors never
repeat: on them the fast path does the full L × L retrieval, the worst case. "auto" (default) is real
where the shape's data is found, else random; every record says which it used.

Timings taken while other processes use the CPU are meaningless on a 2-core machine: every record carries
the load average and the CPU time other processes used while it ran (`foreign_cores`).

One job per module: `shapes` (the shapes and the batches timed), `flops` (the FLOP count), `machine`
(machine info and matmul peaks), `load` (other processes' CPU use), `timing` (seconds per batch of each
mode), `fidelity` (angle to float64), `accuracy` (exact vs fast training), `jobs` (one measurement, in a
fresh process), `report` (the driver and its JSON report).
"""


from analog_ep.bench.accuracy import compare_training
from analog_ep.bench.fidelity import check_fidelity, flat_grads
from analog_ep.bench.flops import FLOP_FORMULA, count_flops
from analog_ep.bench.jobs import run_job, worker
from analog_ep.bench.load import LoadMeter, foreign_load, wait_for_idle
from analog_ep.bench.machine import machine_info, matmul_peak
from analog_ep.bench.report import bench, summary_table
from analog_ep.bench.shapes import (
    CPU_SHAPES,
    INPUTS,
    PAPER_SHAPES,
    SHAPES,
    TEST_SHAPES,
    Shape,
    bench_batch,
    build_shape,
    make_net,
    random_batch,
    real_batch,
    real_data_available,
    resolve_inputs,
    vectors_dim,
)
from analog_ep.bench.timing import WARMUP_BATCHES, PhaseTimer, run_inference, run_reference, run_train

__all__ = [
    "CPU_SHAPES", "FLOP_FORMULA", "INPUTS", "PAPER_SHAPES", "SHAPES", "TEST_SHAPES", "WARMUP_BATCHES", "LoadMeter",
    "PhaseTimer", "Shape", "bench", "bench_batch", "build_shape", "check_fidelity", "compare_training",
    "count_flops", "flat_grads", "foreign_load", "machine_info", "make_net", "matmul_peak", "random_batch",
    "real_batch", "real_data_available", "resolve_inputs", "run_inference", "run_job", "run_reference",
    "run_train", "summary_table", "vectors_dim", "wait_for_idle", "worker",
]
