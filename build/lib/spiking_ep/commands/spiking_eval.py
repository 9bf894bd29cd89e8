"""`seqep spiking-eval`: accuracy, agreement with the analog network and spikes of a run, against timesteps T."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spiking_ep.commands.options import (
    add_command,
    add_data_options,
    add_timesteps_option,
    add_unit_options,
    batches_from_args,
    parse_timesteps,
    spiking_from_args,
)
from spiking_ep.convert import SPIKING_CONFIG

DEFAULT_TIMESTEPS = "32,64,128,256"

EPILOG = """\
examples:
  seqep spiking-eval runs/imdb --timesteps 32,64,128,256 --json
  seqep spiking-eval runs/imdb --limit 1000 --plot runs/imdb/plots/spiking_accuracy.png
  seqep spiking-eval runs/tiny --data test_set.pt       # a torch file {"x": (N,S,L,d), "y": (N,)}
  seqep spiking-eval runs/tiny --synthetic 256          # Gaussian tokens; labels = analog predictions

Data: --data FILE.pt, else --synthetic N, else the "data" section of RUN_DIR/config.json through
analog_ep.data.load_task (the --split split, test by default).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    e = add_command(subparsers, "spiking-eval", "spiking accuracy, agreement and spikes vs timesteps",
                    "Run a trained network with spiking units for T steps and compare its predictions with "
                    "the analog network's, for every T.", EPILOG)
    e.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt")
    add_timesteps_option(e, DEFAULT_TIMESTEPS)
    add_unit_options(e)
    e.add_argument("--readout", choices=["final", "window"], default="final",
                   help="output trace at T, or its mean over (T/2, T] (default final)")
    add_data_options(e)
    e.add_argument("--analog-steps", type=int, help="analog free-phase steps (default: config ep.free_steps×2, "
                                                     "else 100)")
    e.add_argument("--plot", metavar="FILE.png", help="accuracy-vs-T plot (default RUN_DIR/plots/spiking_accuracy.png)")
    e.add_argument("--out", metavar="FILE.json", help="also write the result here")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=run_spiking_eval)


def run_spiking_eval(args: argparse.Namespace) -> int:
    from analog_ep.train import distributed
    from spiking_ep.evaluate import evaluate_spiking, plot_accuracy_vs_timesteps, read_run_config, timesteps_for_gap

    timesteps = parse_timesteps(args.timesteps)
    run_dir = Path(args.run_dir)
    snet = spiking_from_args(args)
    cfg = read_run_config(run_dir)
    ep_cfg = (cfg.get("config") or cfg).get("ep") or {}
    analog_steps = args.analog_steps or 2 * int(ep_cfg.get("free_steps") or 50)
    # under torchrun each rank evaluates its part of the data and all get the whole split's numbers
    with distributed.session("cpu") as world:
        batches = batches_from_args(args, snet, analog_steps)
        result = evaluate_spiking(snet, batches, timesteps, readout=args.readout, analog_steps=analog_steps)
    if not world.is_main:  # rank 0 alone plots, writes and prints
        return 0
    result["world_size"] = world.size
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
