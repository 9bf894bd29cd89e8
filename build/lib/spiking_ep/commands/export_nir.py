"""`seqep export-nir`: the frozen spiking network as a NIR graph (what NIR cannot express named), optionally run
through norse and snntorch against our reference."""

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
  seqep export-nir runs/demo model.nir --check 256 --steps 256     # run it through norse and snntorch
  seqep export-nir runs/demo model_lif.nir --neuron lif            # IF units as their no-leak LIF limit

The graph: IF units (reset to 0, threshold 1), Affine W/2 + b/2 bottom-up and Linear Wᵀ/2 top-down per symmetric
synapse; the attention's query current as output ports; its retrieval (not expressible) is the host's, whose
result flat(s¹) is the graph's input. Details: docs/spiking.md, "NIR export".
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    n = add_command(subparsers, "export-nir", "export the spiking network as a NIR graph (frozen, IF units)",
                    "Export the frozen spiking network as a NIR graph; name each part NIR cannot express.", EPILOG)
    n.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt (or a .pt file)")
    n.add_argument("out", metavar="OUT.nir")
    n.add_argument("--check", type=int, default=0, metavar="N",
                   help="run the file with norse and snntorch (those installed) on N samples (the run's test "
                        "split, else Gaussian inputs) against our reference")
    n.add_argument("--neuron", choices=("if", "lif"), default="if",  # nir_export.NEURON_ENCODINGS (loads torch)
                   help="units as nir.IF (default) or as their no-leak nir.LIF limit (tau = 2^30 dt, dt = 1e-4 s), "
                        "for importers that read nir.IF as a leaky neuron")
    n.add_argument("--steps", type=int, default=256, help="timesteps of the check (default %(default)s)")
    n.add_argument("--json", action="store_true")
    n.set_defaults(handler=run_export_nir)


def run_export_nir(args: argparse.Namespace) -> int:
    from analog_ep.train.checkpoint import load_model
    from spiking_ep.energy.compare import torch_threads
    from spiking_ep.nir_consumers import round_trip
    from spiking_ep.nir_export import export_nir, not_expressible, not_expressible_text

    net, _ = load_model(args.run_dir)
    export = export_nir(net, args.out, metadata={"source_run": str(args.run_dir)}, neuron=args.neuron)
    result: dict[str, Any] = {"path": str(export.path), "nodes": export.nodes, "edges": export.edges,
                              "not_expressible": not_expressible(export.graph)}
    if args.check:
        x, y = check_inputs(args, net)
        with torch_threads(1):
            result["check"] = round_trip(export.path, net, x, args.steps, y)
    if args.json:
        print(json.dumps(result))
        return 0
    print(export.summary())
    print("NIR cannot express these parts of the network; how the export handles them:")
    print(not_expressible_text(export.graph))
    if "check" in result:
        print(check_text(result["check"]))
    else:
        print(f"check it: seqep export-nir {args.run_dir} {args.out} --check 256")
    return 0


def check_text(check: dict[str, Any]) -> str:
    lines = []
    for consumer, c in check["consumers"].items():
        layers = ", ".join(f"{name} {100 * r['identical_trains']:.1f} % ({r['spikes_per_sample']:.2f} spikes per "
                           f"sample, ours {check['spikes_per_sample'][name]:.2f})" for name, r in c["layers"].items())
        count = max(r["max_count_difference"] for r in c["layers"].values())
        query = (f"; query ports within {c['query_port_max_error']:.1e} of Φ's query current"
                 if "query_port_max_error" in c else "")
        lines.append(f"{consumer} round trip ({check['samples']} samples × {check['steps']} steps): identical spike "
                     f"trains {layers}; max count difference {count:.0f}{query}")
    if not check["consumers"]:
        lines.append("no consumer installed (pip install norse snntorch --no-deps): nothing ran the file")
    lines.append(f"predictions agree with the analog network on {100 * check['agreement_with_analog']:.1f} %")
    return "\n".join(lines)


def check_inputs(args: argparse.Namespace, net: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """--check N samples: the run's test split when RUN_DIR is a run, else N seeded Gaussian inputs (no labels)."""
    if (Path(args.run_dir) / "config.json").is_file():
        from spiking_ep.evaluate import run_batches

        batches, _, _ = run_batches(args.run_dir, "test", args.check, args.check, progress=False)
        return next(batches)
    spec = net.spec
    g = torch.Generator().manual_seed(0)
    return torch.randn(args.check, spec.num_streams, spec.seq_len, spec.dim, generator=g), None
