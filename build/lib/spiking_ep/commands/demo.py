"""`seqep demo`: the whole pipeline on IMDB (train analog → convert → compare → NIR), resumable, one table."""

from __future__ import annotations

import argparse
import json
import sys

from spiking_ep.commands.options import add_command, add_timesteps_option, command_line, parse_timesteps

EPILOG = """\
examples:
  seqep demo                                  # everything into runs/demo; run it again to continue
  seqep demo --limit 500 --skip nir           # compare on 500 test reviews, no NIR export
  seqep demo --fresh --timesteps 16,64        # delete runs/demo and start over

stages: train (IMDB smoke preset; a finished run is reused, an interrupted one resumes), convert (sigma-delta),
compare (test subset, cmos45nm and loihi profiles), nir (export + norse round trip). Ctrl-C at any point and run
`seqep demo` again: finished stages are kept, `--skip compare,nir` skips stages.
Data: $SEQEP_DATA_DIR, else ../shared/data next to the repository.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    d = add_command(subparsers, "demo", "the whole job: train analog → convert → spiking eval → energy → NIR",
                    "Train analog EP on IMDB (smoke preset), convert to spiking, compare accuracy, spikes and "
                    "energy, export NIR; prints one table.", EPILOG)
    d.add_argument("--out", default="runs/demo", help="run directory (default %(default)s)")
    add_timesteps_option(d, "8,16,32,64")
    d.add_argument("--fresh", action="store_true", help="delete OUT (a run directory) and train again")
    d.add_argument("--limit", type=int, help="compare on N test reviews only, a seeded random subset (default: the "
                                             "preset's subset)")
    d.add_argument("--skip", default="", help="comma-separated stages to skip: train,convert,compare,nir")
    d.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the smoke model's products are small, and two threads oversubscribe "
                        "a shared 2-core CPU; 0: torch's default)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(handler=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from spiking_ep.demo import run_demo, summary_table

    try:
        summary = run_demo(args.out, parse_timesteps(args.timesteps), fresh=args.fresh, limit=args.limit,
                           skip=[s.strip() for s in args.skip.split(",") if s.strip()], progress=not args.no_progress,
                           command=command_line(args), threads=args.threads or None)
    except KeyboardInterrupt:
        print(f"\nseqep demo: interrupted; run `seqep demo --out {args.out}` again to continue (finished stages and "
              "the training checkpoint are kept)", file=sys.stderr)
        return 130
    print(json.dumps(summary) if args.json else summary_table(summary))
    return 0
