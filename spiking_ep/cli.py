"""`seqep convert` and `seqep spiking-eval`: the spiking backend on a trained run directory.

Registered through the `seqep.commands` entry point (pyproject.toml), so `analog_ep` never imports us.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import ConfigError, DataError
from spiking_ep.attention import ATTENTION_MODES
from spiking_ep.convert import SPIKING_CONFIG, load_spiking, save_spiking_config
from spiking_ep.neurons import CODINGS

ALL_CODINGS = (*CODINGS, "snntorch", "norse")

CONVERT_EPILOG = """\
examples:
  seqep convert runs/imdb                         # sigma-delta units, θ = 1/32 (the default)
  seqep convert runs/imdb --coding if --tau 16    # integrate-and-fire units (the coding to learn with)
  seqep convert runs/imdb --coding bernoulli --attention sample --seed 1

Writes RUN_DIR/spiking.json (the spiking options); the weights stay in RUN_DIR/checkpoints/best.pt,
which may come from a CUDA run: it is loaded on the CPU.
"""

EVAL_EPILOG = """\
examples:
  seqep spiking-eval runs/imdb --timesteps 32,64,128,256 --json
  seqep spiking-eval runs/imdb --limit 1000 --plot runs/imdb/plots/spiking_accuracy.png
  seqep spiking-eval runs/tiny --data test_set.pt       # a torch file {"x": (N,S,L,d), "y": (N,)}
  seqep spiking-eval runs/tiny --synthetic 256          # Gaussian tokens; labels = analog predictions

Data: --data FILE.pt, else --synthetic N, else the "data" section of RUN_DIR/config.json through
analog_ep.data.load_task (the --split split, test by default).
"""


def _add_unit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coding", choices=ALL_CODINGS, help="unit model (default: spiking.json's, else sigma_delta)")
    p.add_argument("--tau", type=float, help="synaptic trace time constant in steps (default 16)")
    p.add_argument("--attention", choices=ATTENTION_MODES, help="winner rule of the Hopfield layer")
    p.add_argument("--threshold", type=float, help="sigma-delta quantum θ (default 1/32)")
    p.add_argument("--seed", type=int, help="random seed of Bernoulli units / sampled attention")


def _unit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(args, k) for k in ("coding", "tau", "attention", "seed")
                           if getattr(args, k) is not None}
    if args.threshold is not None:
        if (args.coding or "sigma_delta") != "sigma_delta":
            raise ConfigError("--threshold is the sigma-delta quantum: use it with --coding sigma_delta")
        out["coding_options"] = {"threshold": args.threshold}
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a trained run to a spiking network (writes spiking.json)",
                              description=__doc__, epilog=CONVERT_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt")
    _add_unit_options(p)
    p.add_argument("--json", action="store_true", help="print the written config as JSON")
    p.set_defaults(handler=run_convert)

    e = subparsers.add_parser("spiking-eval", help="spiking accuracy, agreement and spikes vs timesteps",
                              description=__doc__, epilog=EVAL_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt")
    e.add_argument("--timesteps", default="32,64,128,256", help="comma-separated T values (default %(default)s)")
    _add_unit_options(e)
    e.add_argument("--readout", choices=["final", "window"], default="final",
                   help="output trace at T, or its mean over (T/2, T] (default final)")
    e.add_argument("--data", metavar="FILE.pt", help='torch file with "x" (N,S,L,d) and "y" (N,)')
    e.add_argument("--synthetic", type=int, metavar="N", help="N Gaussian inputs, labels = analog predictions")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of the run's data")
    e.add_argument("--limit", type=int, help="evaluate the first N samples only")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--analog-steps", type=int, help="analog free-phase steps (default: config ep.free_steps×2, "
                                                     "else 100)")
    e.add_argument("--plot", metavar="FILE.png", help="accuracy-vs-T plot (default RUN_DIR/plots/spiking_accuracy.png)")
    e.add_argument("--out", metavar="FILE.json", help="also write the result here")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=run_spiking_eval)


def run_convert(args: argparse.Namespace) -> int:
    overrides = _unit_overrides(args)
    snet = load_spiking(args.run_dir, **{k: v for k, v in overrides.items() if k != "coding_options"})
    if "coding_options" in overrides:
        snet = snet.with_options(coding_options=overrides["coding_options"])
    path = save_spiking_config(snet, args.run_dir)
    if args.json:
        print(json.dumps({"path": str(path), **snet.config()}))
    else:
        spec = snet.spec
        print(f"wrote {path}: {snet.coding_name} units, τ = {snet.tau}, attention {snet.attention.mode}; "
              f"network {spec.name} {' → '.join(spec.layer_names)} ({spec.num_projections} projection layer(s))")
    return 0


def run_spiking_eval(args: argparse.Namespace) -> int:
    from spiking_ep.evaluate import (
        batches_from_run,
        batches_from_tensors,
        evaluate_spiking,
        plot_accuracy_vs_timesteps,
        read_run_config,
        timesteps_for_gap,
    )

    try:
        timesteps = sorted({int(t) for t in args.timesteps.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"--timesteps must be comma-separated integers, got {args.timesteps!r}") from None
    if not timesteps or timesteps[0] < 2:
        raise ConfigError("--timesteps needs integers ≥ 2")
    run_dir = Path(args.run_dir)
    overrides = _unit_overrides(args)
    snet = load_spiking(run_dir, **{k: v for k, v in overrides.items() if k != "coding_options"})
    if "coding_options" in overrides:
        snet = snet.with_options(coding_options=overrides["coding_options"])
    cfg = read_run_config(run_dir)
    ep_cfg = (cfg.get("config") or cfg).get("ep") or {}
    analog_steps = args.analog_steps or 2 * int(ep_cfg.get("free_steps") or 50)
    dtype = snet.net.weights[0].dtype
    if args.data:
        try:
            blob = torch.load(args.data, map_location="cpu", weights_only=True)
            x, y = blob["x"].to(dtype), blob["y"].long()
        except (OSError, KeyError, RuntimeError, TypeError) as err:
            raise DataError(f"cannot read {args.data} as a torch file with 'x' and 'y': {err}") from err
        if args.limit:
            x, y = x[:args.limit], y[:args.limit]
        batches: Any = batches_from_tensors(x, y, args.batch_size)
    elif args.synthetic:
        spec = snet.spec
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.synthetic, spec.num_streams, spec.seq_len, spec.dim, generator=g).to(dtype)
        from analog_ep.dynamics import predict

        y = predict(snet.net, x, analog_steps)
        batches = batches_from_tensors(x, y, args.batch_size)
    else:
        batches = batches_from_run(run_dir, args.split, args.limit, args.batch_size)
    result = evaluate_spiking(snet, batches, timesteps, readout=args.readout, analog_steps=analog_steps)
    result["run_dir"] = str(run_dir)
    result["data"] = args.data or (f"synthetic:{args.synthetic}" if args.synthetic else f"run:{args.split}")
    result["timesteps_for_gap"] = {"1pp": timesteps_for_gap(result, 0.01), "0.5pp": timesteps_for_gap(result, 0.005)}
    plot = Path(args.plot) if args.plot else run_dir / "plots" / "spiking_accuracy.png"
    result["plot"] = str(plot_accuracy_vs_timesteps(result, None, plot))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        cfg_s = result["config"]
        print(f"{run_dir}: {result['samples']} samples, {cfg_s['coding']} units (τ = {cfg_s['tau']}, attention "
              f"{cfg_s['attention']}), analog accuracy {100 * result['analog']['accuracy']:.2f} %")
        print(f"{'T':>6} {'accuracy':>9} {'agreement':>10} {'spikes/sample':>14} {'max FC distance':>16}")
        for T, row in result["timesteps"].items():
            dist = max(v for k, v in row["distance_to_analog"].items() if k != "proj")
            print(f"{T:>6} {100 * row['accuracy']:>8.2f}% {100 * row['agreement']:>9.2f}% "
                  f"{row['spikes_per_sample']:>14.0f} {dist:>16.4f}")
        print(f"plot: {result['plot']}  (default config: {SPIKING_CONFIG} if present)")
    return 0


def evaluate_backend(args: argparse.Namespace) -> int:
    """`seqep evaluate RUN_DIR --backend spiking [--timesteps ...]`: the same as `seqep spiking-eval`."""
    argv = ["spiking-eval", args.run_dir, "--split", args.split, "--timesteps", args.timesteps or "32,64,128,256"]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if args.json:
        argv.append("--json")
    parser = argparse.ArgumentParser(prog="seqep")
    register(parser.add_subparsers())
    return run_spiking_eval(parser.parse_args(argv))
