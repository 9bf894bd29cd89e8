"""`seqep convert`: write a trained run's spiking options (RUN_DIR/spiking.json); the weights stay where they are."""

from __future__ import annotations

import argparse
import json

from spiking_ep.commands.options import add_command, add_unit_options, spiking_from_args
from spiking_ep.convert import save_spiking_config

EPILOG = """\
examples:
  seqep convert runs/imdb                         # sigma-delta units, θ = 1/32 (the default)
  seqep convert runs/imdb --coding if --tau 16    # integrate-and-fire units (the coding to learn with)
  seqep convert runs/imdb --coding bernoulli --attention sample --seed 1

Writes RUN_DIR/spiking.json (the spiking options); the weights stay in RUN_DIR/checkpoints/best.pt,
which may come from a CUDA run: it is loaded on the CPU.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "convert", "convert a trained run to a spiking network (writes spiking.json)",
                    "Convert a trained analog run to a spiking network: choose how its units communicate "
                    "(coding, trace time constant, attention winner rule).", EPILOG)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt")
    add_unit_options(p)
    p.add_argument("--json", action="store_true", help="print the written config as JSON")
    p.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    snet = spiking_from_args(args)
    path = save_spiking_config(snet, args.run_dir)
    if args.json:
        print(json.dumps({"path": str(path), **snet.config()}))
    else:
        spec = snet.spec
        print(f"wrote {path}: {snet.coding_name} units, τ = {snet.tau}, attention {snet.attention.mode}; "
              f"network {spec.name} {' → '.join(spec.layer_names)} ({spec.num_projections} projection layer(s))")
    return 0
