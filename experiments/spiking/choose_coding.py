"""Which coding should `to_spiking` use by default? Accuracy, agreement, distance and spikes vs T.

    python experiments/spiking/choose_coding.py [--out experiments/spiking/results/choose_coding.json]

Model: the tiny token-presence model of experiments/spiking/common.py (trained once, cached in /tmp).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import test_set, tiny_model

from spiking_ep.evaluate import evaluate_spiking, plot_accuracy_vs_timesteps

VARIANTS = [
    ("if", dict(tau=2)), ("if", dict(tau=4)), ("if", dict(tau=8)), ("if", dict(tau=16)),
    ("bernoulli", dict(tau=4)), ("bernoulli", dict(tau=8)),
    ("sigma_delta", dict(threshold=1 / 16)), ("sigma_delta", dict(threshold=1 / 32)),
    ("sigma_delta", dict(threshold=1 / 64)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", default="experiments/spiking/results/choose_coding.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = tiny_model()
    x, y = test_set(args.samples)
    batches = [(x[i:i + 250], y[i:i + 250]) for i in range(0, len(y), 250)]
    results = []
    for coding, options in VARIANTS:
        t0 = time.time()
        res = evaluate_spiking(net, batches, timesteps=(4, 8, 16, 32, 64, 128, 256), coding=coding, **options)
        res["config"]["label"] = f"{coding} {options}"
        results.append(res)
        print(f"{coding} {options}  analog {res['analog']['accuracy']:.3f}  ({time.time() - t0:.0f} s)")
        for T, v in res["timesteps"].items():
            dist = max(v["distance_to_analog"][n] for n in res["layer_names"][1:])
            print(f"   T={T:>4}  acc {v['accuracy']:.3f}  agree {v['agreement']:.3f}  max FC dist {dist:.4f}"
                  f"  spikes/sample {v['spikes_per_sample']:.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot_accuracy_vs_timesteps(results, results[0]["analog"]["accuracy"], out.with_suffix(".png"),
                               title="tiny token-presence model: spiking accuracy vs T")


if __name__ == "__main__":
    main()
