"""Per-sample convergence of a trained run's free phase: how many steps does each sample need?

Batch-level early exit stops when the *slowest* sample of a batch settles; this measures what a
per-sample exit (freeze settled samples, compact the batch) would save. Exact fp32 path, validation
samples drawn at random (seeded; the splits are stored label-ordered).

    python experiments/convergence.py runs/imdb-cpu runs/snli-cpu-ep --samples 256 --tol 1e-4

Prints, per run: steps for each sample's largest state change to fall below tol (mean, median,
90th percentile, max), the fraction of samples settled within the run's T₁, and the batch-level
residual (max over the batch) at T₁.
"""

from __future__ import annotations

import argparse
import json

import torch

from analog_ep.train.checkpoint import load_model
from analog_ep.train.trainer import load_run_data


def steps_to_settle(run_dir: str, samples: int, tol: float, max_steps: int, seed: int = 0) -> dict:
    cfg, task, embedding = load_run_data(run_dir, progress=False)
    net, _ = load_model(run_dir)
    idx = torch.randperm(len(task.val), generator=torch.Generator().manual_seed(seed))[:samples]
    x = embedding[task.val.ids[idx].long()].reshape(len(idx), net.spec.num_streams, net.spec.seq_len, -1)
    inputs = net.prepare(x)
    state = net.zero_state(inputs.batch_size)
    settled_at = torch.full((len(idx),), -1)
    batch_residual_at_t1 = float("nan")
    with torch.no_grad():
        for t in range(1, max_steps + 1):
            new = net.step(inputs, state)
            change = torch.stack([(a - b).abs().flatten(1).amax(1) for a, b in zip(new, state)]).amax(0)
            state = new
            settled_at[(settled_at < 0) & (change < tol)] = t
            if t == cfg.ep.free_steps:
                batch_residual_at_t1 = float(change.max())
    done = settled_at[settled_at > 0].float()
    t1 = cfg.ep.free_steps
    return {
        "run": run_dir, "samples": len(idx), "tol": tol, "free_steps_T1": t1, "settled": len(done),
        "mean": float(done.mean()), "median": float(done.median()), "p90": float(done.quantile(0.9)),
        "max": float(done.max()), "fraction_within_T1": float(((settled_at > 0) & (settled_at <= t1)).float().mean()),
        "batch_residual_at_T1": batch_residual_at_t1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=200)
    args = p.parse_args(argv)
    for run in args.runs:
        print(json.dumps(steps_to_settle(run, args.samples, args.tol, args.max_steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
