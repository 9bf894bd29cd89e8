"""The int8 change products (`analog_ep/fast/delta_int8.py`) against the dense int8 products, on one network and
batch, side by side: seconds per EP batch, the share of the dense work they did, and the angle between the two
EP updates. On the benchmark's network (seed 0, untrained) or on a trained run's, where relaxations settle later.

    python experiments/change_products.py [--run RUN_DIR] [--shape imdb-paper] [--batch 32] [--rounds 3] [--tol T]

Needs the AVX2 int8 kernels (a CPU with AVX2; on an AMX machine they run with SEQEP_INT8_KERNEL=avx2). The two
modes alternate, `--rounds` times each after one warm-up of each; the best time of each is reported, beside all.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace

import torch

from analog_ep.bench.fidelity import flat_grads
from analog_ep.bench.shapes import build_shape, make_net, real_batch
from analog_ep.estimators import EPConfig, ep_symmetric
from analog_ep.fast import delta_int8, lowp_phi, lowp_weights
from analog_ep.gdu import angle_deg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run directory whose best checkpoint to use (its spec must be the shape's)")
    p.add_argument("--shape", default="imdb-paper", help="bench shape: steps, β and the real batch (default "
                   "imdb-paper)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tol", type=float, help="early exit at this residual (default: none, every step, as the "
                   "benchmark and the paper presets run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--float64", action="store_true", help="also each update's angle (and the exact fp32 path's) to "
                   "the exact float64 one, the numbers EP defines (slow at the paper shapes: use a small --batch)")
    p.add_argument("--out", help="write the figures as JSON here too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("SEQEP_INT8_KERNEL", "avx2")
    if lowp_weights.int8_kernel() != "avx2":
        raise SystemExit(f"the AVX2 int8 kernels do not run here: {lowp_weights.avx2_kernels_reason()}")
    shape = build_shape(args.shape)
    if args.run:
        from analog_ep.train.checkpoint import load_model

        net, _ = load_model(args.run)
    else:
        net = make_net(shape)
    x, y = real_batch(shape, args.batch, seed=1)
    cfg = EPConfig(beta=shape.beta, free_steps=shape.free_steps, nudge_steps=shape.nudge_steps, precision="int8",
                   tol=args.tol)
    times: dict[str, list[float]] = {"changes": [], "dense": []}
    grads: dict[str, torch.Tensor] = {}
    work: dict[str, float] = {}
    for round_ in range(args.rounds + 1):  # round 0: warm-up
        for mode in times:
            lowp_phi.FOLLOW_CHANGES = mode == "changes"
            delta_int8.reset_work()
            t = time.perf_counter()
            estimate = ep_symmetric(net, x, y, cfg, set_grad=False)
            if round_:
                times[mode].append(time.perf_counter() - t)
            grads[mode] = flat_grads(estimate.grads)
            if mode == "changes":
                work = delta_int8.work_done()
    report = {
        "shape": args.shape, "batch": args.batch, "run": args.run, "threads": args.threads, "tol": args.tol,
        "seconds": {mode: min(t) for mode, t in times.items()}, "all_seconds": times,
        "ratio": min(times["dense"]) / min(times["changes"]), "work_done": work,
        "angle_between_updates_deg": angle_deg(grads["changes"], grads["dense"]),
    }
    if args.float64:
        exact = replace(cfg, precision="fp32")
        g64 = flat_grads(ep_symmetric(copy.deepcopy(net).double(), x.double(), y, exact, set_grad=False).grads)
        grads["exact fp32"] = flat_grads(ep_symmetric(net, x, y, exact, set_grad=False).grads)
        report["angle_to_float64_deg"] = {mode: angle_deg(g, g64) for mode, g in grads.items()}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
