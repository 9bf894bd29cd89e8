"""`seqep export-nir`: the frozen spiking fully connected part as a NIR graph, optionally checked through norse."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from spiking_ep.commands.options import add_command

EPILOG = """\
examples:
  seqep export-nir runs/demo runs/demo/model.nir
  seqep export-nir runs/demo model.nir --check 256 --steps 256     # run it through norse against our reference

The graph: IF units (reset to 0, threshold 1), Affine W/2 + b/2 bottom-up and Linear Wᵀ/2 top-down per symmetric
synapse; the input is precomputed (the attention layer's output). Details: docs/energy.md, "NIR".
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    n = add_command(subparsers, "export-nir", "export the spiking FC part as a NIR graph (frozen, IF units)",
                    "Export the frozen spiking fully connected part as a NIR graph.", EPILOG)
    n.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt (or a .pt file)")
    n.add_argument("out", metavar="OUT.nir")
    n.add_argument("--check", type=int, default=0, metavar="N",
                   help="run the file with norse on N samples (the run's test split, else Gaussian inputs)")
    n.add_argument("--steps", type=int, default=256, help="timesteps of the check (default %(default)s)")
    n.add_argument("--json", action="store_true")
    n.set_defaults(handler=run_export_nir)


def run_export_nir(args: argparse.Namespace) -> int:
    from analog_ep.train.checkpoint import load_model
    from spiking_ep.energy.compare import torch_threads
    from spiking_ep.nir_export import check_round_trip, export_nir, not_expressible_text

    net, _ = load_model(args.run_dir)
    export = export_nir(net, args.out, metadata={"source_run": str(args.run_dir)})
    result: dict[str, Any] = {"path": str(export.path), "nodes": export.nodes, "edges": export.edges}
    if args.check:
        x, y = check_inputs(args, net)
        with torch_threads(1):
            result["check"] = check_round_trip(export.path, net, x, args.steps, y)
    if args.json:
        print(json.dumps(result))
        return 0
    print(export.summary())
    print("NIR cannot express these parts of the network; how the export handles them:")
    print(not_expressible_text())
    if "check" in result:
        c = result["check"]
        print(f"norse round trip ({c['samples']} samples × {c['steps']} steps): "
              f"{100 * c['identical_output_trains']:.1f} % identical output spike trains, max count difference "
              f"{c['max_count_difference']:.0f}; "
              f"predictions agree with the analog network on {100 * c['agreement_with_analog']:.1f} %")
    else:
        print(f"check it: seqep export-nir {args.run_dir} {args.out} --check 256")
    return 0


def check_inputs(args: argparse.Namespace, net: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """--check N samples: the run's test split when RUN_DIR is a run, else N seeded Gaussian inputs (no labels)."""
    if (Path(args.run_dir) / "config.json").is_file():
        from spiking_ep.evaluate import run_batches

        batches, _, _ = run_batches(args.run_dir, "test", args.check, args.check, progress=False)
        return next(batches)
    spec = net.spec
    g = torch.Generator().manual_seed(0)
    return torch.randn(args.check, spec.num_streams, spec.seq_len, spec.dim, generator=g), None
