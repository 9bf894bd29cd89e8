"""`seqep bench`: seconds per EP training batch, speed-up over the paper's way of running it, GFLOP/s vs peak."""

from __future__ import annotations

import argparse
import json
import sys

from analog_ep.bench import CPU_SHAPES, PAPER_SHAPES, SHAPES, bench, compare_training, summary_table
from analog_ep.bench.accuracy import fast_mode
from analog_ep.errors import ConfigError
from analog_ep.fast.folded import REQUESTS as FOLD_REQUESTS
from analog_ep.fast.precision import REQUESTS as PRECISION_REQUESTS

EPILOG = """\
examples:
  seqep bench --shape imdb-paper --batch 32 --json          # one shape and batch size, all T1 and K steps
  seqep bench --shape paper --precision int8 --json         # our int8 kernels: AMX, else AVX2 (refused without)
  seqep bench --shape imdb-paper --precision fp32           # the exact path
  seqep bench --shape imdb-tiny --precision bf16-emulated --peak-size 512  # bf16 where it is emulated (slow)
  seqep bench --shape paper --early-exit                    # + stop phases at the residual tolerance
  seqep bench --shape all --check-fidelity --wait-idle 0.2  # everything, waiting for an idle machine
  seqep bench --shape snli-cpu --no-reference               # fast path only
  seqep bench --shape imdb-paper --batch 32 --inputs random  # worst case: no word ever repeats

Shapes: imdb-paper (L=600, d=300, FC 1000-40-2, T1=50, K=25; batches 32 and 128), snli-paper (L=25+25,
d=300, FC 400-3, T1=60, K=30; batch 256), imdb-cpu and snli-cpu (experiments/presets/*-cpu.toml),
imdb-tiny and snli-tiny (seconds, for checks). Inputs: a seeded batch of the real training split where
its data is found (SEQEP_DATA_DIR), else random vectors; --inputs chooses. Speed depends on the data: the
fast path's retrieval skips repeated words and padding (random vectors never repeat), and early exit.
Each measurement runs in its own process; the paper shapes take minutes (the reference mode ~40 s a batch).
On a shared machine, look at foreign_cores in the output: timings with other work running are not valid.
"""

SHAPE_CHOICES = (*SHAPES, "paper", "cpu", "all")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time EP training batches against the reference mode and matmul peak",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPE_CHOICES, default="all",
                   help="a shape, or paper / cpu / all (default all = paper + cpu shapes)")
    p.add_argument("--batch", type=int, help="batch size (default: the shape's: 32 and 128 for imdb-paper, ...)")
    p.add_argument("--fold-keys", choices=FOLD_REQUESTS, default="auto",
                   help="auto (default): on the exact fp32 path, relax with the first synapse folded onto each "
                        "sequence's distinct keys where that saves enough (short sentences, wide vectors: "
                        "snli-paper and snli-cpu where our AVX2 kernel loads, snli-paper elsewhere); on: wherever "
                        "it can run; off: the plain relaxation")
    p.add_argument("--precision", choices=PRECISION_REQUESTS, default="auto",
                   help="auto (default): the fastest faithful mode on this machine, from a few seconds' calibration "
                        "cached per machine; fp32: the exact path; bf16: the fast path on bf16 operands (fast with "
                        "AVX512-BF16 or AMX; refused on a CPU without bf16 instructions, where torch emulates bf16 "
                        "26-49x slower than fp32: bf16-emulated runs it anyway); int8: the large FC weights in int8 "
                        "with our AMX kernels (the fastest at both paper shapes on an AMX CPU) or our AVX2 kernels "
                        "(about twice the fp32 rate on a CPU without AMX, and from step to step only the rows and "
                        "codes that changed: the report's change_products; where the exact path folds, as at "
                        "SNLI, the folded exact path runs instead, 1.6-4.7x faster: --fold-keys off runs int8); "
                        "refused where neither loads, since oneDNN's int8 kernels take hundreds of times as long "
                        "there: int8-library runs them anyway. With --accuracy: the fast mode compared with the "
                        "exact path")
    p.add_argument("--early-exit", action=argparse.BooleanOptionalAction, default=False,
                   help="stop each phase at the residual tolerance. Off by default: the benchmark's random-weight "
                        "networks settle in ~11 of 50 steps while trained ones mostly run to T1 "
                        "(docs/benchmarks.md), so early exit here would overstate the training speed-up")
    p.add_argument("--tol", type=float, help="early-exit residual tolerance (default: the preset's, else 1e-4)")
    p.add_argument("--inputs", choices=["auto", "real", "random"], default="auto",
                   help="real: a seeded batch of the task's training split (needs its data); random: Gaussian "
                        "vectors, no repeated words (the fast path's worst case); auto (default): real where "
                        "the shape's data is found, else random")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the reference-equivalent mode (autograd every step, fp32, phases in turn)")
    p.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the free phase alone (inference throughput)")
    p.add_argument("--check-fidelity", action="store_true",
                   help="angle between the fast path's EP update and the float64 EP update")
    p.add_argument("--fidelity-batch", type=int, default=4, help="batch size of the fidelity check (default 4)")
    p.add_argument("--accuracy", action="store_true",
                   help="instead of timing: train a CPU shape (real data) with the exact path and the fast path "
                        "at --precision, same seed, and compare validation accuracy")
    p.add_argument("--train-limit", type=int, default=4000, help="training reviews/pairs for --accuracy")
    p.add_argument("--epochs", type=int, default=1, help="epochs for --accuracy")
    p.add_argument("--data-dir", help="data directory for --accuracy (default: $SEQEP_DATA_DIR)")
    p.add_argument("--repeats", type=int, default=1, help="timed batches per measurement, best kept (default 1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed full batches before timing, every mode (default 2)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, = cores)")
    p.add_argument("--compile", dest="compile_kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the bf16 path's fused elementwise kernel (first run compiles ~30 s)")
    p.add_argument("--in-process", action="store_true",
                   help="run measurements in this process (faster start; peak RSS then covers all of them)")
    p.add_argument("--wait-idle", type=float, metavar="CORES",
                   help="before each measurement wait until other processes use fewer than CORES cores")
    p.add_argument("--wait-timeout", type=float, default=1800.0, help="give up waiting after this many seconds")
    p.add_argument("--peak-size", dest="peak_sizes", type=int, action="append",
                   help="square matmul size for the peak measurement (repeatable; default 2048 and 4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", metavar="FILE.json", help="also write the JSON report here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.shape == "all":
        shapes = [*PAPER_SHAPES, *CPU_SHAPES] if not args.accuracy else list(CPU_SHAPES)
    elif args.shape == "paper":
        shapes = list(PAPER_SHAPES)
    elif args.shape == "cpu":
        shapes = list(CPU_SHAPES)
    else:
        shapes = [args.shape]
    if args.batch is not None and args.batch < 1:
        raise ConfigError("--batch must be ≥ 1")
    if args.repeats < 1:
        raise ConfigError("--repeats must be ≥ 1")

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    if args.accuracy:
        if any(s not in CPU_SHAPES for s in shapes):
            raise ConfigError(f"--accuracy trains the CPU shapes only ({', '.join(CPU_SHAPES)}); pick one with --shape")
        for name in shapes:  # every shape's fast mode before any training: a refusal comes first
            fast_mode(name, args.precision)
        results = [compare_training(name, args.train_limit, args.epochs, args.data_dir, args.tol, log,
                                    args.compile_kernels, args.precision) for name in shapes]
        print(json.dumps({"accuracy": results}, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"accuracy": results}, f, indent=2)
        return 0

    def save(partial: dict) -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(partial, f, indent=2)

    report = bench(shapes, batch=args.batch, precision=args.precision,
                   fold_keys=args.fold_keys, early_exit=args.early_exit, tol=args.tol,
                   inputs=args.inputs, reference=args.reference, inference=args.inference, fidelity=args.check_fidelity,
                   fidelity_batch=args.fidelity_batch, repeats=args.repeats, warmup=args.warmup,
                   threads=args.threads,
                   compile_kernels=args.compile_kernels, subprocesses=not args.in_process,
                   wait_idle=args.wait_idle, wait_timeout=args.wait_timeout,
                   peak_sizes=tuple(args.peak_sizes or (2048, 4096)), log=log, on_result=save)
    save(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(summary_table(report))
    return 0
