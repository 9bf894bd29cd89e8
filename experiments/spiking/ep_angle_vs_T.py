"""Does the EP gradient read off spikes converge to the analog EP gradient as T grows? (angle vs T)

    python experiments/spiking/ep_angle_vs_T.py [--model imdb] [--estimator symmetric|cep]

Network: a tiny paper-shaped network (analog_ep.models, tiny=True, bias_offset=1, float64), Gaussian tokens.
Reference: analog symmetric EP at the same β with both phases converged (free 200, nudge 100 steps).
Spiking: free T steps, nudged T/2 steps (±β), Hebbian products accumulated over the last T/4 steps.
With --estimator cep: spiking C-EP (η = 1e-9, plasticity trace τ_p = T/8) against analog two-phase EP.
Variants are "coding:tau[:attention]".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from analog_ep.estimators import EPConfig, ep_symmetric, ep_two_phase
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from spiking_ep.convert import to_spiking
from spiking_ep.learning import (
    SpikingEPConfig,
    angle_degrees,
    per_layer_angles,
    spiking_cep_on_copy,
    spiking_ep_symmetric,
)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, curve in results["curves"].items():
        ax.plot([r["T"] for r in curve], [r["angle"] for r in curve], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("free-phase timesteps T (nudged T/2)")
    ax.set_ylabel("angle to analog EP (degrees)")
    ax.set_title(f"{results['estimator']} from spikes, {results['model']} tiny, β={results['beta']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="imdb")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--codings", default="if:8,if:16,if:32,if:16:dense,if:32:dense,bernoulli:16,sigma_delta")
    parser.add_argument("--hebbian", default="trace")
    parser.add_argument("--estimator", choices=["symmetric", "cep"], default="symmetric")
    parser.add_argument("--timesteps", default="32,64,128,256,512,1024,2048")
    parser.add_argument("--out", default="experiments/spiking/results/ep_angle_symmetric.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = EPNet(build_spec(args.model, tiny=True, bias_offset=1.0), seed=0).double()
    g = torch.Generator().manual_seed(1)
    spec = net.spec
    x = torch.randn(args.batch, spec.num_streams, spec.seq_len, spec.dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, spec.num_classes, (args.batch,), generator=g)
    reference = ep_symmetric if args.estimator == "symmetric" else ep_two_phase
    analog = reference(net, x, y, EPConfig(args.beta, 200, 100), set_grad=False).grads
    results = {"model": args.model, "beta": args.beta, "batch": args.batch, "hebbian": args.hebbian,
               "estimator": args.estimator, "curves": {}}
    for item in args.codings.split(","):
        coding, tau, attention = (item.split(":") + ["", ""])[:3]  # e.g. "if:16:dense"
        snet = to_spiking(net, coding, tau=float(tau) if tau else 8.0, attention=attention or None)
        curve = []
        for T in map(int, args.timesteps.split(",")):
            t0 = time.time()
            if args.estimator == "symmetric":
                cfg = SpikingEPConfig(args.beta, T, T // 2, window=T // 4, hebbian=args.hebbian)
                est = spiking_ep_symmetric(snet, x, y, cfg, set_grad=False)
            else:
                est = spiking_cep_on_copy(snet, x, y, SpikingEPConfig(args.beta, T, T // 2, plasticity_tau=T / 8), 1e-9)
            row = {"T": T, "angle": angle_degrees(est.grads, analog),
                   "layers": per_layer_angles(net, est.grads, analog),
                   "norm_ratio": float(sum(v.norm() ** 2 for v in est.grads.values()).sqrt()
                                       / sum(v.norm() ** 2 for v in analog.values()).sqrt()),
                   "spikes_per_sample": sum(est.record.spikes_per_sample().values()), "seconds": time.time() - t0}
            curve.append(row)
            print(f"{item:>14} T={T:>5} angle {row['angle']:6.2f}°  layers "
                  + " ".join(f"{k} {v:5.1f}" for k, v in row["layers"].items())
                  + f"  |g|/|g_analog| {row['norm_ratio']:.2f}  ({row['seconds']:.1f} s)", flush=True)
        results["curves"][item] = curve
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
