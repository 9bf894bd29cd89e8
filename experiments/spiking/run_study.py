"""Spiking vs analog on a trained run: accuracy / agreement / spikes vs T for several codings.

    SEQEP_DATA_DIR=../shared/data python experiments/spiking/run_study.py RUN_DIR --limit 1000 \\
        --out experiments/spiking/results/imdb_study.json

Variants are "coding:tau[:attention]" (sigma-delta: "sigma_delta:θ"). One spiking run per variant and
batch gives every T (see spiking_ep.evaluate).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from analog_ep.train.checkpoint import load_model
from spiking_ep.convert import to_spiking
from spiking_ep.evaluate import batches_from_run, evaluate_spiking, plot_accuracy_vs_timesteps, timesteps_for_gap


def parse_variant(item: str) -> tuple[str, dict]:
    coding, *rest = item.split(":")
    options: dict = {}
    if coding == "sigma_delta":
        if rest and rest[0]:
            options["threshold"] = float(rest[0])
        if len(rest) > 1:
            options["attention"] = rest[1]
    else:
        if rest and rest[0]:
            options["tau"] = float(rest[0])
        if len(rest) > 1:
            options["attention"] = rest[1]
    return coding, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--which", default="best.pt", help="checkpoint file in RUN_DIR/checkpoints")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--split", default="test")
    parser.add_argument("--timesteps", default="8,16,32,64,128,256")
    parser.add_argument("--variants", default="if:4,if:8,if:16,bernoulli:8,sigma_delta:0.0625,sigma_delta:0.015625")
    parser.add_argument("--analog-steps", type=int, default=100)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net, _ = load_model(Path(args.run_dir) / "checkpoints" / args.which)
    batches = list(batches_from_run(args.run_dir, args.split, args.limit, 250))
    timesteps = [int(t) for t in args.timesteps.split(",")]
    results = []
    for item in args.variants.split(","):
        coding, options = parse_variant(item)
        t0 = time.time()
        res = evaluate_spiking(to_spiking(net, coding, **options), batches, timesteps, analog_steps=args.analog_steps)
        res["config"]["variant"] = item
        res["timesteps_for_gap"] = {"1pp": timesteps_for_gap(res, 0.01), "0.5pp": timesteps_for_gap(res, 0.005)}
        results.append(res)
        print(f"{item}: analog {100 * res['analog']['accuracy']:.2f} %  T(1pp) {res['timesteps_for_gap']['1pp']}  "
              f"T(0.5pp) {res['timesteps_for_gap']['0.5pp']}  ({time.time() - t0:.0f} s)", flush=True)
        for T, v in res["timesteps"].items():
            dist = max(d for n, d in v["distance_to_analog"].items() if n != "proj")
            print(f"   T={T:>4}  acc {100 * v['accuracy']:6.2f}  agree {100 * v['agreement']:6.2f}  "
                  f"max FC dist {dist:.4f}  spikes/sample {v['spikes_per_sample']:.0f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run_dir": args.run_dir, "checkpoint": args.which, "split": args.split,
                               "limit": args.limit, "results": results}, indent=1))
    plot_accuracy_vs_timesteps(results, results[0]["analog"]["accuracy"], out.with_suffix(".png"),
                               title=f"{Path(args.run_dir).name}: spiking accuracy vs T")


if __name__ == "__main__":
    main()
