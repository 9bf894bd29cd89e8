"""`seqep compare`: the analog-vs-spiking report of a run (accuracy, spikes, energy per profile, plots)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from analog_ep.errors import ConfigError
from analog_ep.train import distributed
from spiking_ep.commands.options import (
    add_command,
    add_data_options,
    add_timesteps_option,
    add_unit_options,
    batches_from_args,
    command_line,
    parse_timesteps,
    spiking_from_args,
)
from spiking_ep.energy.compare import DEFAULT_PROFILES, DEFAULT_TIMESTEPS, CompareOptions, compare_run, ep_settings
from spiking_ep.energy.report import console_table

EPILOG = """\
examples:
  seqep compare runs/demo                                   # T = 8,16,32,64; profiles cmos45nm and loihi
  seqep compare runs/imdb --timesteps 16,64,256 --limit 1000 --profile loihi
  seqep compare runs/imdb --profile my_chip.toml            # your own prices (format: energy/profiles/*.toml)
  seqep compare runs/tiny --synthetic 256 --coding if --tau 8

Writes RUN_DIR/compare/compare.json, compare.md (paste-ready tables: accuracy, spikes, energy per inference and
per training sample, break-even spike rate, the constants and their sources) and compare/plots/*.png.
Conventions and formulas: docs/energy.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    c = add_command(subparsers, "compare", "analog vs spiking: accuracy, spikes and energy report with plots",
                    "Accuracy, spike counts and energy of a run, analog vs spiking.", EPILOG)
    c.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt")
    add_timesteps_option(c, ",".join(map(str, DEFAULT_TIMESTEPS)))
    c.add_argument("--profile", action="append", metavar="NAME|FILE",
                   help=f"energy profile(s), comma-separated or repeated (default {','.join(DEFAULT_PROFILES)})")
    add_unit_options(c)
    add_data_options(c)
    c.add_argument("--probe-samples", type=int, default=16,
                   help="samples for firing-rate histograms, raster and the training-step spikes (default 16)")
    c.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: faster than 2 for these small products on a shared CPU; 0: torch's)")
    c.add_argument("--attention-drift", type=float, metavar="L1",
                   help="with --attention event: the drift of the first FC layer's trace (L1) that makes a sample "
                        "recompute its attention (default 2; 0: every step)")
    c.add_argument("--memory", action="store_true",
                   help="count weight reads on both sides (priced only by a profile that gives weight_read with "
                        "its source; the shipped ones do not)")
    c.add_argument("--no-plots", action="store_true")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(handler=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    snet = spiking_from_args(args)
    if args.attention_drift is not None:
        if snet.attention.mode != "event":
            raise ConfigError("--attention-drift is the event threshold: use it with --attention event")
        snet = replace(snet, attention=replace(snet.attention, drift=args.attention_drift))
    profiles = [p for item in (args.profile or [",".join(DEFAULT_PROFILES)]) for p in item.split(",") if p.strip()]
    options = CompareOptions(parse_timesteps(args.timesteps), profiles, args.probe_samples, args.threads or None,
                             plots=not args.no_plots, progress=not args.no_progress, command=command_line(args),
                             memory=args.memory)
    with distributed.session("cpu") as world:  # under torchrun each rank evaluates its part of the data
        options.progress = options.progress and world.is_main
        batches = None
        if args.data or args.synthetic:
            ep = ep_settings(args.run_dir)
            batches = batches_from_args(args, snet, ep.eval_free_steps or ep.free_steps)
            options.data = {"source": args.data or f"synthetic:{args.synthetic} (labels = analog predictions)",
                            "split": "file" if args.data else "synthetic", "limit": args.limit}
        report = compare_run(args.run_dir, snet, args.split, args.limit, args.batch_size, options, batches)
    if not world.is_main:  # rank 0 alone measured the rest, wrote the report and prints it
        return 0
    print(json.dumps(report) if args.json else console_table(report))
    return 0
